"""Synthetic captioning scenes: coloured shapes, their pictures and their captions.

This is the generator behind the `shapes_captions` TFDS builder (DESIGN §3), kept free of TensorFlow so
that it can be read, tested and reused on its own. A scene is a few coloured geometric shapes placed on a
plain background without overlap; it is rendered to an RGB array with hard (not anti-aliased) edges, and
described by reference captions drawn from paraphrase templates.

Every caption must be true of its picture, so the generator only ever says what the geometry guarantees:
- each object in an image has its own colour, so "the blue square" always names exactly one object;
- sizes come from two disjoint ranges of side lengths ("small" and "large"), far apart;
- "a left of b" is said only when a's bounding box ends at least `gap` pixels before b's begins (likewise
    for right, above and below), and objects are placed so that every pair is separated that way along at
    least one axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
        "red": (215, 35, 35),
        "orange": (245, 140, 20),
        "yellow": (240, 210, 20),
        "green": (40, 160, 60),
        "blue": (40, 90, 220),
        "purple": (130, 55, 180),
        "pink": (245, 120, 190),
        "brown": (125, 75, 35),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_RELATION_WORDS = {
        "left": ("to the left of", "left of", "on the left of"),
        "right": ("to the right of", "right of", "on the right of"),
        "above": ("above", "over"),
        "below": ("below", "under", "beneath"),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn: canvas, object count, size classes and spacing (all in pixels).

    Attributes:
        image_size: side of the square canvas.
        min_objects / max_objects: inclusive range of the number of objects per image.
        small_sides / large_sides: inclusive ranges of the bounding-box side of small and large objects.
        gap: minimum empty space between the bounding boxes of two objects along the axis that separates them;
            this is the margin by which "left of" / "above" are true.
        border: minimum empty space between an object and the canvas edge.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    small_sides: tuple[int, int] = (10, 13)
    large_sides: tuple[int, int] = (20, 25)
    gap: int = 4
    border: int = 2

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"SceneSpec: need 1 <= min_objects <= max_objects, got "
                             f"min_objects={self.min_objects}, max_objects={self.max_objects}")
        if self.max_objects > len(COLORS):
            raise ValueError(f"SceneSpec.max_objects={self.max_objects} exceeds the {len(COLORS)} colours "
                             "available (every object in an image has its own colour)")
        if self.max_objects >= len(_NUMBER_WORDS):
            raise ValueError(f"SceneSpec.max_objects={self.max_objects}: captions can count up to "
                             f"{len(_NUMBER_WORDS) - 1} objects")
        (s0, s1), (l0, l1) = self.small_sides, self.large_sides
        if not 4 <= s0 <= s1 < l0 <= l1:
            raise ValueError(f"SceneSpec: need 4 <= small_sides <= large_sides and disjoint ranges, got "
                             f"small_sides={self.small_sides}, large_sides={self.large_sides}")
        if l1 + 2 * self.border > self.image_size:
            raise ValueError(f"SceneSpec: large_sides={self.large_sides} do not fit in image_size="
                             f"{self.image_size} with border={self.border}")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: what it is and where. The box is [x0, x0 + side) x [y0, y0 + side) in pixels."""

    shape: str
    color: str
    size: str
    x0: int
    y0: int
    side: int

    @property
    def x1(self) -> int:
        return self.x0 + self.side

    @property
    def y1(self) -> int:
        return self.y0 + self.side

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.side / 2, self.y0 + self.side / 2)


def sample_scene(rng: np.random.Generator, spec: SceneSpec, max_tries: int = 1000) -> list[SceneObject]:
    """Draws a random scene: distinct colours, random shapes and sizes, non-overlapping placement.

    Objects are placed one after the other by rejection sampling; a scene that cannot be completed is
    restarted. Raises if `max_tries` restarts fail, which means the spec asks for too much on its canvas.
    """
    for _ in range(max_tries):
        n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
        colors = rng.choice(len(COLORS), size=n, replace=False)
        objects: list[SceneObject] = []
        for color_index in colors:
            size = SIZES[int(rng.integers(len(SIZES)))]
            lo, hi = spec.small_sides if size == "small" else spec.large_sides
            side = int(rng.integers(lo, hi + 1))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            placed = _place(rng, spec, side, objects)
            if placed is None:
                break
            color = COLOR_NAMES[int(color_index)]
            objects.append(SceneObject(shape, color, size, x0=placed[0], y0=placed[1], side=side))
        if len(objects) == n:
            return objects
    raise RuntimeError(f"could not place {spec.max_objects} objects on a {spec.image_size}px canvas after "
                       f"{max_tries} attempts; enlarge the canvas or shrink the objects ({spec})")


def _place(rng: np.random.Generator, spec: SceneSpec, side: int, others: Sequence[SceneObject],
           tries: int = 100) -> tuple[int, int] | None:
    """Finds a top-left corner for a box of `side` that keeps `spec.gap` from every other box."""
    hi = spec.image_size - spec.border - side
    for _ in range(tries):
        x0, y0 = (int(v) for v in rng.integers(spec.border, hi + 1, size=2))
        candidate = SceneObject("", "", "", x0, y0, side)
        if all(holding_relations(candidate, o, spec.gap) for o in others):
            return x0, y0
    return None


def holding_relations(a: SceneObject, b: SceneObject, gap: int) -> list[str]:
    """Relations of `a` with respect to `b` that are true by at least `gap` empty pixels."""
    relations = []
    if a.x1 + gap <= b.x0:
        relations.append("left")
    if b.x1 + gap <= a.x0:
        relations.append("right")
    if a.y1 + gap <= b.y0:
        relations.append("above")
    if b.y1 + gap <= a.y0:
        relations.append("below")
    return relations


def relation(a: SceneObject, b: SceneObject, gap: int) -> str | None:
    """The relation used to describe `a` with respect to `b`, or None if no relation holds.

    When two relations hold (a diagonal arrangement), the one along the axis of larger centre displacement
    is chosen, as a person would ("above" for something far above and a little to the left).
    """
    holding = holding_relations(a, b, gap)
    if not holding:
        return None
    (ax, ay), (bx, by) = a.center, b.center
    return max(holding, key=lambda r: abs(ax - bx) if r in ("left", "right") else abs(ay - by))


def render(objects: Sequence[SceneObject], image_size: int) -> np.ndarray:
    """Draws the scene as a uint8 RGB array of shape (image_size, image_size, 3), hard edges."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        fill = COLORS[o.color]
        left, top, right, bottom = o.x0, o.y0, o.x1 - 1, o.y1 - 1
        middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
        if o.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif o.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(middle_x, top), (right, bottom), (left, bottom)], fill=fill)
        elif o.shape == "diamond":
            corners = [(middle_x, top), (right, middle_y), (middle_x, bottom), (left, middle_y)]
            draw.polygon(corners, fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; expected one of {SHAPES}")
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# Captions.


class _Writer:
    """Word choices for one caption: synonyms picked at random, kept consistent within the caption."""

    def __init__(self, rng: np.random.Generator, gap: int):
        self.rng = rng
        self.gap = gap
        self._size_words: dict[str, str] = {}

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def noun(self, o: SceneObject, with_size: bool = True) -> str:
        """"large red circle" (or "red circle" without size); one size synonym per caption."""
        if not with_size:
            return f"{o.color} {o.shape}"
        if o.size not in self._size_words:
            self._size_words[o.size] = self.pick(_SIZE_WORDS[o.size])
        return f"{self._size_words[o.size]} {o.color} {o.shape}"

    def a(self, o: SceneObject) -> str:
        """First mention, with the size: "a large red circle", "an orange square"."""
        noun = self.noun(o)
        return ("an " if noun[0] in "aeiou" else "a ") + noun

    def the(self, o: SceneObject, with_size: bool | None = None) -> str:
        """Later mention; the size may be dropped since colours are unique within an image."""
        if with_size is None:
            with_size = bool(self.rng.integers(2))
        return "the " + self.noun(o, with_size)

    def rel(self, name: str) -> str:
        return self.pick(_RELATION_WORDS[name])

    def relation(self, a: SceneObject, b: SceneObject) -> str:
        r = relation(a, b, self.gap)
        if r is None:
            raise ValueError(f"no relation holds between {a} and {b} with gap {self.gap}: the scene breaks "
                             "its own spacing rule")
        return r

    def pair(self, a: SceneObject, b: SceneObject) -> tuple[SceneObject, str, SceneObject]:
        """(subject, relation, reference) for two objects, in a random one of the two directions."""
        if self.rng.integers(2):
            a, b = b, a
        return a, self.relation(a, b), b


def _one(c: _Writer, objects: Sequence[SceneObject]) -> list[str]:
    (x,) = objects
    return [
        c.a(x),
        f"there is {c.a(x)}",
        f"{c.a(x)} on a plain background",
        f"a single {c.noun(x)}",
        f"an image of {c.a(x)}",
        f"one {c.noun(x)}",
        f"a picture with {c.a(x)}",
    ]


def _two(c: _Writer, objects: Sequence[SceneObject]) -> list[str]:
    x, r, y = c.pair(*objects)
    xa, ya, rel = c.a(x), c.a(y), c.rel(r)
    return [
        f"{xa} {rel} {ya}",
        f"there is {xa} {rel} {ya}",
        f"{c.the(x, True)} is {rel} {c.the(y, True)}",
        f"{xa} sits {rel} {ya}",
        f"two shapes {xa} {rel} {ya}",
        f"{xa} {rel} {ya} on a plain background",
        f"two shapes {xa} and {ya}",
    ]


def _three(c: _Writer, objects: Sequence[SceneObject]) -> list[str]:
    p, q, z = (objects[i] for i in c.rng.permutation(3))
    x, r1, y = c.pair(p, q)
    v = (p, q)[int(c.rng.integers(2))]
    r2 = c.relation(z, v)
    xa, ya, za, rel1, rel2, vt = c.a(x), c.a(y), c.a(z), c.rel(r1), c.rel(r2), c.the(v)
    return [
        f"{xa} {rel1} {ya} and {za} {rel2} {vt}",
        f"there is {xa} {rel1} {ya} and {za} {rel2} {vt}",
        f"{c.the(x, True)} is {rel1} {c.the(y, True)} and {c.the(z, True)} is {rel2} {vt}",
        f"{xa} {rel1} {ya} with {za} {rel2} {vt}",
        f"three shapes {xa} {ya} and {za}",
        f"{xa} {ya} and {za} on a plain background",
    ]


def _paragraph(c: _Writer, objects: Sequence[SceneObject]) -> str:
    """A paragraph for many objects: a count, then every object placed relative to one already named."""
    n = len(objects)
    order = [objects[i] for i in c.rng.permutation(n)]
    count = _NUMBER_WORDS[n]
    opener = c.pick((f"there are {count} shapes", f"this picture shows {count} shapes",
                     f"an image with {count} shapes", f"{count} shapes are shown"))
    x, r, y = c.pair(order[0], order[1])
    clauses = [f"{c.a(x)} is {c.rel(r)} {c.a(y)}"]
    named = [order[0], order[1]]
    for z in order[2:]:
        # Place the new object relative to the nearest one already named (some relation always holds).
        v = min(named, key=lambda o: np.hypot(o.center[0] - z.center[0], o.center[1] - z.center[1]))
        verb = c.pick(("is ", "", "sits "))
        clauses.append(f"{c.a(z)} {verb}{c.rel(c.relation(z, v))} {c.the(v, False)}")
        named.append(z)
    return opener + " " + " and ".join(clauses)


# Caption templates by object count; each function returns one caption per template.
_TEMPLATES = {1: _one, 2: _two, 3: _three}


def make_captions(objects: Sequence[SceneObject], rng: np.random.Generator, gap: int,
                  num: int = 5, max_tries: int = 50) -> list[str]:
    """`num` distinct reference captions for a scene, lowercase and without punctuation.

    Scenes of one to three objects get captions from `num` different templates chosen at random, each
    with its own word choices and order of mention (one object gives a short caption, three a long one).
    Larger scenes get paragraphs naming every object relative to one named before, in a random order.
    """
    if len(objects) in _TEMPLATES:
        templates = _TEMPLATES[len(objects)]
        count = len(templates(_Writer(rng, gap), objects))
        if count < num:
            raise ValueError(f"make_captions: {num} captions asked but only {count} templates exist for "
                             f"{len(objects)} objects")
        chosen = sorted(int(i) for i in rng.choice(count, size=num, replace=False))
        return [templates(_Writer(rng, gap), objects)[i] for i in chosen]
    captions: list[str] = []
    for _ in range(max_tries):
        caption = _paragraph(_Writer(rng, gap), objects)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == num:
            return captions
    raise RuntimeError(f"could not write {num} distinct paragraphs in {max_tries} tries for {objects}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One generated example: the picture, its objects and its reference captions."""

    image: np.ndarray
    objects: list[SceneObject]
    captions: list[str]


def generate_example(spec: SceneSpec, seed: int, stream: int, index: int, num_captions: int = 5) -> Example:
    """The example number `index` of stream `stream` (one stream per split) for a base `seed`.

    Each example has its own random generator seeded by (seed, stream, index), so an example does not depend
    on the order or number of examples generated before it, and the same arguments give the same bytes.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, index]))
    objects = sample_scene(rng, spec)
    captions = make_captions(objects, rng, spec.gap, num_captions)
    return Example(render(objects, spec.image_size), objects, captions)
