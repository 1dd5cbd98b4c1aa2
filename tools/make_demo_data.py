"""Generate a small synthetic "shapes" data set for CPU demo runs of all three tasks.

The same seed always gives byte-identical files. One call writes three standard layouts under ``--out``:

* ``imagenet/``: mmpretrain ``CustomDataset`` / ImageNet folders, one 64x64 shape per image.
* ``coco/``: COCO instance segmentation (``train2017``, ``val2017``, ``annotations/instances_*.json``), 160x128 images.
* ``ade/ADEChallengeData2016/``: ADE20K-style semantic segmentation (label 0 = ignore, 1 = background), 128x128.

Shapes are filled polygons (circles are 32-gons) of the classes ``circle``, ``square``, ``triangle`` and ``cross``,
sized by the diameter of their circumscribed circle, in a colour that contrasts with a noisy gradient background.

``--scale N`` multiplies every split's image count by N (learning runs on a GPU use more data than the CPU
demo: docs/benchmarks.md).

``--image PATH`` writes only one scene for ``demo/image_demo.py`` (``demo/demo.jpg`` is made this way): 320x256, four
shapes of every class at twice the size of the detection set's, so that the detection and segmentation test
pipelines (which resize to 160x128 and 128x128) see them at the scale they were trained on.

A stamp file ``<out>/.complete`` (generator version, seed, scale, counts) is written last, so a second call returns at
once and an interrupted run is regenerated the next time. Usage::

    python tools/make_demo_data.py                      # writes data/demo
    python tools/make_demo_data.py --out data/demo --seed 0 --force
    python tools/make_demo_data.py --image demo/demo.jpg  # the inference demo's picture
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

GENERATOR_VERSION = 2
CLASSES = ('circle', 'square', 'triangle', 'cross')
"""Shape classes; COCO category ids are 1..4 in this order."""
SEG_CLASSES = ('background', ) + CLASSES
"""Semantic classes after ``reduce_zero_label=True``; the stored label maps hold these values plus 1."""
SEG_PALETTE = [[120, 120, 120], [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48]]

STAMP_NAME = '.complete'
PARTIAL_NAME = '.incomplete'
TASK_DIRS = ('imagenet', 'coco', 'ade')

CLS_SIZE = 64
CLS_PER_CLASS = {'train': 100, 'val': 25}
DET_SIZE = (160, 128)  # (W, H)
DET_IMAGES = {'train2017': 24, 'val2017': 8}
SEG_SIZE = (128, 128)  # (W, H)
SEG_IMAGES = {'training': 24, 'validation': 8}
ADE_PREFIX = {'training': 'ADE_train', 'validation': 'ADE_val'}
SEG_IGNORE, SEG_BACKGROUND = 0, 1

JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95]
CIRCLE_VERTICES = 32
CROSS_HALF_WIDTH = 0.32  # half arm width relative to the arm length

Shape = Tuple[str, np.ndarray]  # (class name, (N, 2) int32 polygon in pixel coordinates)


def _unit_polygon(kind: str) -> np.ndarray:
    """Vertices of a shape centred at the origin whose farthest vertex lies on the unit circle.

    Args:
        kind: One of ``CLASSES``.

    Returns:
        (N, 2) float array of (x, y) vertices in drawing order.
    """
    if kind == 'circle':
        angles = np.arange(CIRCLE_VERTICES) * (2 * np.pi / CIRCLE_VERTICES)
    elif kind == 'square':
        angles = np.pi / 4 + np.arange(4) * (np.pi / 2)
    elif kind == 'triangle':
        angles = -np.pi / 2 + np.arange(3) * (2 * np.pi / 3)
    elif kind == 'cross':
        arm, half = 1.0, CROSS_HALF_WIDTH
        quarter = np.array([[half, -arm], [half, -half], [arm, -half]])  # one arm tip and the inner corner
        turns = [np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) for a in np.arange(4) * (np.pi / 2)]
        points = np.concatenate([quarter @ rot.T for rot in turns])  # (12, 2)
        return points / np.hypot(arm, half)
    else:
        raise ValueError(f'unknown shape {kind!r}; valid shapes: {CLASSES}')
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Integer polygon of one shape; exactly these vertices are drawn and stored.

    Args:
        kind: One of ``CLASSES``.
        cx: Centre x in pixels.
        cy: Centre y in pixels.
        radius: Radius of the circumscribed circle in pixels.
        angle: Rotation in radians.

    Returns:
        (N, 2) int32 array of (x, y) vertices.
    """
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = _unit_polygon(kind) @ rot.T * radius + np.array([cx, cy])
    return np.round(points).astype(np.int32)


def _background(rng: np.random.Generator, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """A linear two-colour gradient in a random direction.

    Returns:
        The (H, W, 3) float32 BGR image and its mean colour, shape (3, ).
    """
    start = rng.integers(40, 216, size=3).astype(np.float32)
    end = np.clip(start + rng.integers(-40, 41, size=3), 0, 255).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xs * np.cos(theta) + ys * np.sin(theta)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)  # (H, W) in [0, 1]
    image = start * (1 - t[..., None]) + end * t[..., None]  # (H, W, 3)
    return image.astype(np.float32), (start + end) / 2


def _contrast_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> Tuple[int, int, int]:
    """A colour that differs from ``bg_mean`` by about 88 or more in every channel."""
    colour = (bg_mean.astype(np.int64) + 128 + rng.integers(-40, 41, size=3)) % 256
    return tuple(int(c) for c in colour)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Add mild Gaussian noise and convert to uint8."""
    noisy = image + rng.normal(0.0, 4.0, size=image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _place_circles(rng: np.random.Generator, width: int, height: int, num: int, min_diam: float,
                   max_diam: float) -> List[Tuple[float, float, float]]:
    """Random non-overlapping circles (with a 2 px gap) fully inside the image.

    A circle that finds no free spot in 100 tries is dropped, so fewer than ``num`` may come back.

    Returns:
        A list of (cx, cy, radius).
    """
    placed: List[Tuple[float, float, float]] = []
    for _ in range(num):
        radius = rng.uniform(min_diam, max_diam) / 2
        for _ in range(100):
            cx = rng.uniform(radius + 1, width - 2 - radius)
            cy = rng.uniform(radius + 1, height - 2 - radius)
            if all(np.hypot(cx - x, cy - y) >= radius + r + 2 for x, y, r in placed):
                placed.append((cx, cy, radius))
                break
    return placed


def _scene(rng: np.random.Generator, width: int, height: int, num_range: Tuple[int, int],
           diam_range: Tuple[float, float]) -> Tuple[np.ndarray, List[Shape]]:
    """A background with ``num_range`` (min, max) random shapes, drawn with ``cv2.fillPoly`` (no antialiasing).

    Shapes that find no free spot are dropped (see ``_place_circles``).

    Returns:
        The (H, W, 3) uint8 BGR image and the drawn shapes.
    """
    image, bg_mean = _background(rng, width, height)
    shapes: List[Shape] = []
    num = int(rng.integers(num_range[0], num_range[1] + 1))
    for cx, cy, radius in _place_circles(rng, width, height, num, *diam_range):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        polygon = _shape_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        cv2.fillPoly(image, [polygon], _contrast_colour(rng, bg_mean), lineType=cv2.LINE_8)
        shapes.append((kind, polygon))
    return _finish(rng, image), shapes


def _write_image(path: Path, image: np.ndarray, params: Optional[List[int]] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image, params or []):
        raise OSError(f'cv2.imwrite could not write {path}')


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + '\n')


def _make_classification(root: Path, seed: int, scale: int = 1) -> Dict[str, int]:
    """ImageNet-style folders ``<split>/<class>/<class>_<i>.JPEG`` with ``meta/<split>.txt`` and ``classes.txt``."""
    names = sorted(CLASSES)  # mmpretrain's CustomDataset labels folders in sorted order
    counts = {}
    for split_idx, (split, per_class) in enumerate(CLS_PER_CLASS.items()):
        rng = np.random.default_rng([seed, 0, split_idx])
        lines = []
        for label, kind in enumerate(names):
            for i in range(per_class * scale):
                image, bg_mean = _background(rng, CLS_SIZE, CLS_SIZE)
                radius = rng.uniform(0.5, 0.9) * CLS_SIZE / 2
                jitter = min(CLS_SIZE / 8, CLS_SIZE / 2 - 1 - radius)
                cx, cy = CLS_SIZE / 2 + rng.uniform(-jitter, jitter, size=2)
                polygon = _shape_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi))
                cv2.fillPoly(image, [polygon], _contrast_colour(rng, bg_mean), lineType=cv2.LINE_8)
                rel = f'{kind}/{kind}_{i}.JPEG'
                _write_image(root / split / rel, _finish(rng, image), JPEG_PARAMS)
                lines.append(f'{rel} {label}')
        (root / 'meta').mkdir(parents=True, exist_ok=True)
        (root / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
        counts[f'imagenet/{split}'] = len(lines)
    (root / 'classes.txt').write_text('\n'.join(names) + '\n')
    return counts


def _polygon_area(polygon: np.ndarray) -> float:
    """Shoelace area of an (N, 2) polygon."""
    x, y = polygon[:, 0].astype(np.float64), polygon[:, 1].astype(np.float64)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _make_coco(root: Path, seed: int, scale: int = 1) -> Dict[str, int]:
    """COCO ``<split>/<id:012d>.jpg`` and ``annotations/instances_<split>.json``; ids are unique across splits."""
    width, height = DET_SIZE
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)]
    counts = {}
    image_id = ann_id = 0
    for split_idx, (split, num_images) in enumerate(DET_IMAGES.items()):
        rng = np.random.default_rng([seed, 1, split_idx])
        images, annotations = [], []
        for _ in range(num_images * scale):
            image_id += 1
            image, shapes = _scene(rng, width, height, (1, 3), (24, 64))
            file_name = f'{image_id:012d}.jpg'
            _write_image(root / split / file_name, image, JPEG_PARAMS)
            images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
            for kind, polygon in shapes:
                ann_id += 1
                (x0, y0), (x1, y1) = polygon.min(axis=0), polygon.max(axis=0)
                annotations.append(
                    dict(id=ann_id, image_id=image_id, category_id=CLASSES.index(kind) + 1,
                         segmentation=[polygon.astype(np.float64).ravel().tolist()], area=_polygon_area(polygon),
                         bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)], iscrowd=0))
        coco = dict(info=dict(description='vssm synthetic shapes demo data', version=str(GENERATOR_VERSION)),
                    licenses=[], images=images, annotations=annotations, categories=categories)
        _write_json(root / 'annotations' / f'instances_{split}.json', coco)
        counts[f'coco/{split}'] = num_images * scale
        counts[f'coco/instances_{split}'] = len(annotations)
    return counts


def _make_ade(root: Path, seed: int, scale: int = 1) -> Dict[str, int]:
    """ADE20K-style ``images/<split>/<name>.jpg`` and ``annotations/<split>/<name>.png`` label maps.

    Labels: 0 ignore (a 1 px ring on each shape's boundary), 1 background, 2..5 the ``CLASSES`` in order.
    """
    width, height = SEG_SIZE
    counts = {}
    for split_idx, (split, num_images) in enumerate(SEG_IMAGES.items()):
        rng = np.random.default_rng([seed, 2, split_idx])
        for i in range(num_images * scale):
            image, shapes = _scene(rng, width, height, (2, 4), (28, 56))
            label = np.full((height, width), SEG_BACKGROUND, dtype=np.uint8)
            for kind, polygon in shapes:
                cv2.fillPoly(label, [polygon], CLASSES.index(kind) + 2, lineType=cv2.LINE_8)
                cv2.polylines(label, [polygon], True, SEG_IGNORE, thickness=1, lineType=cv2.LINE_8)
            name = f'{ADE_PREFIX[split]}_{i + 1:08d}'
            _write_image(root / 'images' / split / f'{name}.jpg', image, JPEG_PARAMS)
            _write_image(root / 'annotations' / split / f'{name}.png', label)
        counts[f'ade/{split}'] = num_images * scale
    return counts


DEMO_IMAGE_SIZE = (320, 256)  # (W, H): twice DET_SIZE


def make_demo_image(path: str, seed: int = 0) -> List[str]:
    """Write one demo scene (``DEMO_IMAGE_SIZE``, JPEG) with one shape of each class; returns the classes in the
    order drawn.

    Args:
        path: Output file (its folder is created).
        seed: Random seed; the same seed gives the same file.
    """
    width, height = DEMO_IMAGE_SIZE
    rng = np.random.default_rng([seed, 3])
    image, bg_mean = _background(rng, width, height)
    kinds = [CLASSES[i] for i in rng.permutation(len(CLASSES))]
    circles = []
    while len(circles) < len(kinds):  # place again until every class has its spot
        circles = _place_circles(rng, width, height, len(kinds), 60, 110)
    for kind, (cx, cy, radius) in zip(kinds, circles):
        polygon = _shape_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        cv2.fillPoly(image, [polygon], _contrast_colour(rng, bg_mean), lineType=cv2.LINE_8)
    _write_image(Path(path), _finish(rng, image), JPEG_PARAMS)
    return kinds


def _read_stamp(out: Path) -> Optional[dict]:
    """The stamp's content, or None if it is missing or unreadable."""
    try:
        return json.loads((out / STAMP_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _claim_output(out: Path, force: bool) -> None:
    """Mark ``out`` as being written and clear the task folders of an earlier (partial) run.

    Raises:
        FileExistsError: If ``out`` holds task folders that this tool did not write and ``force`` is False.
    """
    existing = [name for name in TASK_DIRS if (out / name).exists()]
    ours = (out / STAMP_NAME).exists() or (out / PARTIAL_NAME).exists()
    if existing and not ours and not force:
        raise FileExistsError(f'{out} already holds {existing}, which tools/make_demo_data.py did not write; '
                              'choose another --out, or pass --force to delete and replace them')
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_NAME).touch()
    (out / STAMP_NAME).unlink(missing_ok=True)
    for name in existing:
        shutil.rmtree(out / name)


def make_demo_data(out: str, seed: int = 0, force: bool = False, scale: int = 1) -> dict:
    """Write the classification, COCO and ADE20K-style demo sets under ``out``, unless already complete.

    Args:
        out: Output root; it receives ``imagenet/``, ``coco/`` and ``ade/ADEChallengeData2016/``.
        seed: Non-negative random seed; the same seed gives byte-identical files.
        force: Regenerate even if ``out`` is complete (deletes and rewrites the three task folders).
        scale: Positive multiplier of every split's image count (1: the CPU demo's sizes).

    Returns:
        ``dict(out=<out>, seed=<seed>, skipped=<True if nothing was written>, counts={<split>: <count>})``,
        where ``counts`` holds the images per split (e.g. ``'coco/val2017'``) and the COCO instances per split
        (``'coco/instances_val2017'``).

    Raises:
        ValueError: If ``seed`` is negative or ``scale`` is not positive.
        FileExistsError: If ``out`` holds task folders that this tool did not write and ``force`` is False.
    """
    if seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed}')
    if scale < 1:
        raise ValueError(f'scale must be a positive integer, got {scale}')
    root = Path(out)
    stamp = _read_stamp(root)
    if (not force and stamp is not None and stamp.get('generator_version') == GENERATOR_VERSION
            and stamp.get('seed') == seed and stamp.get('scale', 1) == scale):
        return dict(out=str(root), seed=seed, skipped=True, counts=stamp['counts'])

    _claim_output(root, force)
    counts = {}
    counts.update(_make_classification(root / 'imagenet', seed, scale))
    counts.update(_make_coco(root / 'coco', seed, scale))
    counts.update(_make_ade(root / 'ade' / 'ADEChallengeData2016', seed, scale))

    tmp = root / f'{STAMP_NAME}.tmp'
    stamp = dict(generator_version=GENERATOR_VERSION, seed=seed, scale=scale, counts=counts)
    tmp.write_text(json.dumps(stamp, indent=1) + '\n')
    os.replace(tmp, root / STAMP_NAME)  # the stamp appears last and atomically
    (root / PARTIAL_NAME).unlink()
    return dict(out=str(root), seed=seed, skipped=False, counts=counts)


def main() -> None:
    """Command-line entry point: parse the arguments, generate, print a summary."""
    parser = argparse.ArgumentParser(description='Generate the synthetic shapes demo data (classification, '
                                     'COCO instance segmentation, ADE20K-style semantic segmentation).')
    parser.add_argument('--out', default='data/demo', help='output root (default: data/demo)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    parser.add_argument('--scale', type=int, default=1, help="multiply every split's image count (default: 1)")
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if the output is complete; deletes <out>/{imagenet,coco,ade}')
    parser.add_argument('--image', help='write only one demo scene (320x256 JPEG) to this file, e.g. demo/demo.jpg')
    args = parser.parse_args()
    if args.image:
        kinds = make_demo_image(args.image, seed=args.seed)
        print(f'demo image (seed {args.seed}, {", ".join(kinds)}) written to {Path(args.image).resolve()}')
        return

    start = time.perf_counter()
    result = make_demo_data(args.out, seed=args.seed, force=args.force, scale=args.scale)
    elapsed = time.perf_counter() - start
    action = 'already complete, skipped' if result['skipped'] else f'generated in {elapsed:.1f} s'
    print(f'demo data (seed {result["seed"]}) in {Path(result["out"]).resolve()}: {action}')
    for split, count in result['counts'].items():
        print(f'  {split:<28} {count:>4}')


if __name__ == '__main__':
    main()
