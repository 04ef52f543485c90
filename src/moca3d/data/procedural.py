"""Procedural part-composed objects and multi-object scenes (the built-in demo domain).

Every part is one watertight primitive (box, cylinder, sphere, capsule, cone, torus) with a
meaningful name; proportions, optional parts and colours are drawn from a seeded generator, so an
(seed, index) pair always gives the same asset. Frame: y up, objects stand on y = 0 facing +z.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import trimesh

from moca3d.errors import ConfigError

MAX_PARTS = 32
SPHERE_SUBDIVISIONS = 2  # 320 triangles
SECTIONS = 20  # around cylinders, cones, capsules and tori
Rng = np.random.Generator


@dataclass
class ProceduralAsset:
    """A generated asset: components (parts or instances) in one frame, with names and colours."""

    id: str
    kind: str  # "object" | "scene"
    category: str
    meshes: list[trimesh.Trimesh]
    names: list[str]
    colors: np.ndarray  # (N, 4) uint8 RGBA, one per component


# ----------------------------------------------------------------------------- primitives


def _orient(mesh: trimesh.Trimesh, axis: str, center) -> trimesh.Trimesh:
    """Turn a z-aligned primitive to lie along `axis` ('x', 'y' or 'z'), then move it to `center`."""
    if axis == "x":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, [0, 1, 0]))
    elif axis == "y":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))
    mesh.apply_translation(center)
    return mesh


def box(size, center) -> trimesh.Trimesh:
    """Axis-aligned box with extents `size` centred at `center`."""
    return trimesh.creation.box(extents=size).apply_translation(center)


def cylinder(radius: float, height: float, center, axis: str = "y") -> trimesh.Trimesh:
    """Capped cylinder along `axis`."""
    return _orient(trimesh.creation.cylinder(radius=radius, height=height, sections=SECTIONS), axis, center)


def capsule(radius: float, length: float, center, axis: str = "y") -> trimesh.Trimesh:
    """Capsule along `axis` whose total length (caps included) is `length`."""
    mesh = trimesh.creation.capsule(height=max(length - 2 * radius, 1e-3), radius=radius, count=[SECTIONS, SECTIONS // 2])
    return _orient(mesh, axis, center)


def sphere(radius: float, center) -> trimesh.Trimesh:
    """Icosphere."""
    return trimesh.creation.icosphere(subdivisions=SPHERE_SUBDIVISIONS, radius=radius).apply_translation(center)


def cone(radius: float, height: float, base_center, axis: str = "y", top_radius: float = 0.0) -> trimesh.Trimesh:
    """Cone (or frustum when `top_radius` > 0) standing on `base_center`, pointing along +axis."""
    if top_radius > 0:
        ring = np.linspace(0, 2 * math.pi, SECTIONS, endpoint=False)
        circle = lambda r, z: np.stack([r * np.cos(ring), r * np.sin(ring), np.full_like(ring, z)], 1)
        mesh = trimesh.convex.convex_hull(np.concatenate([circle(radius, 0.0), circle(top_radius, height)]))
    else:
        mesh = trimesh.creation.cone(radius=radius, height=height, sections=SECTIONS)
    return _orient(mesh, axis, base_center)


def torus(major: float, minor: float, center, axis: str = "y") -> trimesh.Trimesh:
    """Torus whose symmetry axis is `axis`."""
    mesh = trimesh.creation.torus(major_radius=major, minor_radius=minor, major_sections=SECTIONS + 4, minor_sections=10)
    return _orient(mesh, axis, center)


class _Parts:
    """Collects named parts with material keys while a category builds an object."""

    def __init__(self) -> None:
        self.meshes: list[trimesh.Trimesh] = []
        self.names: list[str] = []
        self.materials: list[str] = []

    def add(self, name: str, mesh: trimesh.Trimesh, material: str) -> None:
        """Append a part (silently dropped beyond MAX_PARTS)."""
        if len(self.meshes) < MAX_PARTS:
            self.meshes.append(mesh)
            self.names.append(name)
            self.materials.append(material)


# ----------------------------------------------------------------------------- categories
# Each builder draws proportions from `rng` and adds parts; sizes are roughly in metres.


def _legs(p: _Parts, rng: Rng, w: float, d: float, h: float, inset: float, material: str, round_legs: bool) -> None:
    """Four legs under a rectangle of width w and depth d, from y = 0 to y = h."""
    t = rng.uniform(0.03, 0.06)
    for i, (sx, sz) in enumerate([(-1, -1), (1, -1), (-1, 1), (1, 1)]):
        c = [sx * (w / 2 - inset), h / 2, sz * (d / 2 - inset)]
        name = ["leg_back_left", "leg_back_right", "leg_front_left", "leg_front_right"][i]
        p.add(name, cylinder(t / 2, h, c) if round_legs else box([t, h, t], c), material)


def chair(p: _Parts, rng: Rng) -> None:
    """Seat, four legs, a solid or slatted back, optional arms and stretchers."""
    w, d, seat_h = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.5)
    seat_t, back_h = rng.uniform(0.03, 0.08), rng.uniform(0.35, 0.6)
    _legs(p, rng, w, d, seat_h, 0.04, "frame", round_legs=rng.random() < 0.4)
    p.add("seat", box([w, seat_t, d], [0, seat_h + seat_t / 2, 0]), "seat")
    top = seat_h + seat_t
    if rng.random() < 0.5:
        p.add("backrest", box([w, back_h, 0.04], [0, top + back_h / 2, -d / 2 + 0.02]), "seat")
    else:
        for side in (-1, 1):
            p.add(f"back_post_{'left' if side < 0 else 'right'}", box([0.04, back_h, 0.04], [side * (w / 2 - 0.02), top + back_h / 2, -d / 2 + 0.02]), "frame")
        for k in range(int(rng.integers(2, 6))):
            y = top + back_h * (0.25 + 0.7 * k / 5)
            p.add(f"back_slat_{k}", box([w - 0.08, 0.04, 0.03], [0, y, -d / 2 + 0.02]), "frame")
    if rng.random() < 0.35:
        arm_h = rng.uniform(0.18, 0.25)
        for side in (-1, 1):
            label = "left" if side < 0 else "right"
            p.add(f"arm_{label}", box([0.05, 0.04, d], [side * (w / 2 + 0.025), top + arm_h, 0]), "frame")
            p.add(f"arm_support_{label}", box([0.04, arm_h, 0.04], [side * (w / 2 + 0.025), top + arm_h / 2, d / 2 - 0.05]), "frame")
    if rng.random() < 0.4:
        y = seat_h * rng.uniform(0.2, 0.4)
        for side in (-1, 1):
            p.add(f"stretcher_{'left' if side < 0 else 'right'}", box([0.025, 0.025, d - 0.08], [side * (w / 2 - 0.04), y, 0]), "frame")


def table(p: _Parts, rng: Rng) -> None:
    """Rectangular top on four legs (with apron, shelf) or a round top on a pedestal."""
    h = rng.uniform(0.45, 0.8)
    top_t = rng.uniform(0.03, 0.06)
    if rng.random() < 0.35:
        r = rng.uniform(0.35, 0.6)
        p.add("top", cylinder(r, top_t, [0, h + top_t / 2, 0]), "top")
        p.add("pedestal", cylinder(rng.uniform(0.04, 0.08), h, [0, h / 2, 0]), "frame")
        if rng.random() < 0.5:
            p.add("base", cylinder(r * rng.uniform(0.4, 0.7), 0.04, [0, 0.02, 0]), "frame")
        else:
            for k in range(int(rng.integers(3, 5))):
                a = 2 * math.pi * k / 4 + 0.3
                p.add(f"foot_{k}", box([0.05, 0.04, r * 0.6], [0, 0.02, 0]).apply_transform(
                    trimesh.transformations.rotation_matrix(a, [0, 1, 0], point=[0, 0, 0])).apply_translation(
                    [0.3 * r * math.sin(a), 0, 0.3 * r * math.cos(a)]), "frame")
        return
    w, d = rng.uniform(0.8, 1.8), rng.uniform(0.5, 1.0)
    p.add("top", box([w, top_t, d], [0, h + top_t / 2, 0]), "top")
    _legs(p, rng, w, d, h, rng.uniform(0.04, 0.12), "frame", round_legs=rng.random() < 0.5)
    if rng.random() < 0.5:
        a = 0.08
        p.add("apron_front", box([w - 0.2, a, 0.02], [0, h - a / 2, d / 2 - 0.09]), "frame")
        p.add("apron_back", box([w - 0.2, a, 0.02], [0, h - a / 2, -d / 2 + 0.09]), "frame")
    if rng.random() < 0.3:
        p.add("lower_shelf", box([w - 0.2, 0.025, d - 0.2], [0, h * 0.25, 0]), "top")


def lamp(p: _Parts, rng: Rng) -> None:
    """Base, pole, optional joint and arm, shade and bulb (floor or desk lamp)."""
    floor = rng.random() < 0.5
    pole_h = rng.uniform(1.2, 1.7) if floor else rng.uniform(0.25, 0.45)
    base_r = rng.uniform(0.12, 0.2) if floor else rng.uniform(0.07, 0.12)
    base_t = rng.uniform(0.02, 0.05)
    if rng.random() < 0.7:
        p.add("base", cylinder(base_r, base_t, [0, base_t / 2, 0]), "metal")
    else:
        p.add("base", box([2 * base_r, base_t, 2 * base_r], [0, base_t / 2, 0]), "metal")
    p.add("pole", cylinder(0.015, pole_h, [0, base_t + pole_h / 2, 0]), "metal")
    head = np.array([0.0, base_t + pole_h, 0.0])
    if rng.random() < 0.5:
        p.add("joint", sphere(0.03, head), "metal")
        arm = rng.uniform(0.15, 0.4)
        p.add("arm", cylinder(0.012, arm, head + [0, 0, arm / 2], axis="z"), "metal")
        head = head + [0, 0, arm]
    shade_h, shade_r = rng.uniform(0.12, 0.3), rng.uniform(0.08, 0.22)
    top_r = shade_r * rng.uniform(0.3, 0.8) if rng.random() < 0.7 else 0.0
    p.add("shade", cone(shade_r, shade_h, head - [0, shade_h * 0.6, 0], top_radius=top_r), "shade")
    if rng.random() < 0.6:
        p.add("bulb", sphere(min(0.04, shade_r * 0.4), head - [0, shade_h * 0.45, 0]), "bulb")


def shelf(p: _Parts, rng: Rng) -> None:
    """Bookcase: sides, top, bottom, shelves, optional back panel and books."""
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.25, 0.4), rng.uniform(0.8, 2.0)
    t = 0.025
    for side in (-1, 1):
        p.add(f"side_{'left' if side < 0 else 'right'}", box([t, h, d], [side * (w / 2 - t / 2), h / 2, 0]), "wood")
    p.add("top", box([w, t, d], [0, h - t / 2, 0]), "wood")
    p.add("bottom", box([w - 2 * t, t, d], [0, t / 2 + 0.05, 0]), "wood")
    levels = int(rng.integers(1, 5))
    ys = [0.05 + t + (h - 0.05 - 2 * t) * (k + 1) / (levels + 1) for k in range(levels)]
    for k, y in enumerate(ys):
        p.add(f"shelf_{k}", box([w - 2 * t, t, d], [0, y, 0]), "wood")
    if rng.random() < 0.6:
        p.add("back_panel", box([w, h, 0.01], [0, h / 2, -d / 2 - 0.005]), "panel")
    floors = [0.05 + t] + [y + t / 2 for y in ys]
    for k, y0 in enumerate(floors):
        x = -w / 2 + t + 0.01
        for b in range(int(rng.integers(0, 5))):
            bw, bh = rng.uniform(0.03, 0.08), min(rng.uniform(0.15, 0.3), (h - 2 * t) / (levels + 1) - 0.03)
            if x + bw > w / 2 - t or bh <= 0.02:
                break
            p.add(f"book_{k}_{b}", box([bw, bh, d * 0.8], [x + bw / 2, y0 + bh / 2, 0]), f"book{b % 3}")
            x += bw + 0.005


def vehicle(p: _Parts, rng: Rng) -> None:
    """Car or truck: body, cabin, wheels (tyre + hub), optional lights and spoiler."""
    length, width = rng.uniform(1.6, 2.6), rng.uniform(0.8, 1.1)
    wheel_r = rng.uniform(0.15, 0.25)
    body_h = rng.uniform(0.25, 0.45)
    body_y = wheel_r + body_h / 2 - 0.05
    p.add("body", box([width, body_h, length], [0, body_y, 0]), "paint")
    cabin_l = length * rng.uniform(0.35, 0.55)
    cabin_h = rng.uniform(0.25, 0.45)
    cabin_z = rng.uniform(-0.2, 0.05) * length
    p.add("cabin", box([width * 0.9, cabin_h, cabin_l], [0, body_y + body_h / 2 + cabin_h / 2, cabin_z]), "glass")
    tori = rng.random() < 0.5
    for sz in (-1, 1):
        for sx in (-1, 1):
            label = f"{'front' if sz > 0 else 'rear'}_{'left' if sx < 0 else 'right'}"
            c = [sx * width / 2, wheel_r, sz * length * 0.32]
            if tori:
                p.add(f"tyre_{label}", torus(wheel_r * 0.75, wheel_r * 0.25, c, axis="x"), "rubber")
                p.add(f"hub_{label}", cylinder(wheel_r * 0.55, 0.08, c, axis="x"), "metal")
            else:
                p.add(f"wheel_{label}", cylinder(wheel_r, 0.14, c, axis="x"), "rubber")
    if rng.random() < 0.6:
        for sx in (-1, 1):
            p.add(f"headlight_{'left' if sx < 0 else 'right'}", sphere(0.06, [sx * width * 0.32, body_y + body_h * 0.15, length / 2]), "light")
    if rng.random() < 0.3:
        p.add("spoiler", box([width * 0.9, 0.03, 0.15], [0, body_y + body_h / 2 + 0.12, -length / 2 + 0.1]), "paint")


def figure(p: _Parts, rng: Rng) -> None:
    """Humanoid or robot: torso, head, arms, legs, optional hands, feet and hat."""
    robot = rng.random() < 0.5
    leg_l, torso_h = rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.75)
    hip_w, limb_r = rng.uniform(0.25, 0.4), rng.uniform(0.045, 0.08)
    for sx in (-1, 1):
        side = "left" if sx < 0 else "right"
        c = [sx * hip_w / 3, leg_l / 2 + 0.05, 0]
        p.add(f"leg_{side}", box([2 * limb_r, leg_l, 2 * limb_r], c) if robot else capsule(limb_r, leg_l, c), "limb")
        if rng.random() < 0.7:
            p.add(f"foot_{side}", box([limb_r * 2.2, 0.06, limb_r * 3.5], [sx * hip_w / 3, 0.03, limb_r]), "shoe")
    torso_y = leg_l + torso_h / 2
    if robot:
        p.add("torso", box([hip_w * 1.2, torso_h, hip_w * 0.6], [0, torso_y, 0]), "body")
    else:
        p.add("torso", capsule(hip_w * 0.5, torso_h, [0, torso_y, 0]), "body")
    arm_l = rng.uniform(0.45, 0.7)
    shoulder_y = leg_l + torso_h - 0.05
    for sx in (-1, 1):
        side = "left" if sx < 0 else "right"
        x = sx * (hip_w * 0.6 + limb_r + 0.02)
        c = [x, shoulder_y - arm_l / 2, 0]
        p.add(f"arm_{side}", box([1.6 * limb_r, arm_l, 1.6 * limb_r], c) if robot else capsule(limb_r * 0.8, arm_l, c), "limb")
        if rng.random() < 0.6:
            p.add(f"hand_{side}", sphere(limb_r * 1.1, [x, shoulder_y - arm_l - limb_r * 0.6, 0]), "skin")
    head_r = rng.uniform(0.1, 0.16)
    head_y = leg_l + torso_h + head_r + 0.04
    p.add("head", box([2 * head_r] * 3, [0, head_y, 0]) if robot else sphere(head_r, [0, head_y, 0]), "skin")
    if rng.random() < 0.35:
        if robot:
            p.add("antenna", cylinder(0.01, 0.15, [0, head_y + head_r + 0.07, 0]), "body")
        else:
            p.add("hat", cone(head_r * 1.1, head_r * 1.5, [0, head_y + head_r * 0.6, 0]), "hat")


def bed(p: _Parts, rng: Rng) -> None:
    """Frame, mattress, headboard, optional footboard, legs and pillows."""
    w, length = rng.uniform(0.9, 1.8), rng.uniform(1.9, 2.2)
    leg_h, frame_t = rng.uniform(0.1, 0.25), rng.uniform(0.1, 0.2)
    _legs(p, rng, w, length, leg_h, 0.05, "wood", round_legs=False)
    p.add("frame", box([w, frame_t, length], [0, leg_h + frame_t / 2, 0]), "wood")
    mat_t = rng.uniform(0.15, 0.3)
    top = leg_h + frame_t + mat_t
    p.add("mattress", box([w - 0.05, mat_t, length - 0.05], [0, top - mat_t / 2, 0]), "fabric")
    head_h = rng.uniform(0.4, 0.9)
    p.add("headboard", box([w, head_h, 0.06], [0, leg_h + head_h / 2, -length / 2 - 0.03]), "wood")
    if rng.random() < 0.5:
        foot_h = head_h * rng.uniform(0.4, 0.7)
        p.add("footboard", box([w, foot_h, 0.05], [0, leg_h + foot_h / 2, length / 2 + 0.025]), "wood")
    count = int(rng.integers(1, 3)) if w > 1.2 else 1
    for k in range(count):
        x = 0 if count == 1 else (k - 0.5) * w / 2
        p.add(f"pillow_{k}", capsule(0.07, min(0.6, w / count - 0.1), [x, top + 0.05, -length / 2 + 0.25], axis="x"), "pillow")


def sofa(p: _Parts, rng: Rng) -> None:
    """Base, seat cushions, back, arms and short legs."""
    w, d = rng.uniform(1.4, 2.4), rng.uniform(0.75, 1.0)
    leg_h, base_h = rng.uniform(0.05, 0.15), rng.uniform(0.15, 0.3)
    _legs(p, rng, w, d, leg_h, 0.06, "wood", round_legs=True)
    p.add("base", box([w, base_h, d], [0, leg_h + base_h / 2, 0]), "fabric")
    seats = int(rng.integers(1, 4))
    arm_w = rng.uniform(0.1, 0.2)
    inner = w - 2 * arm_w
    cush_t = rng.uniform(0.1, 0.18)
    for k in range(seats):
        cw = inner / seats
        p.add(f"seat_cushion_{k}", box([cw - 0.01, cush_t, d - 0.2], [-inner / 2 + cw * (k + 0.5), leg_h + base_h + cush_t / 2, 0.1]), "cushion")
    back_h = rng.uniform(0.35, 0.55)
    p.add("back", box([w, back_h, 0.2], [0, leg_h + base_h + back_h / 2, -d / 2 + 0.1]), "fabric")
    arm_h = rng.uniform(0.15, 0.3)
    for sx in (-1, 1):
        p.add(f"arm_{'left' if sx < 0 else 'right'}", box([arm_w, base_h + arm_h, d], [sx * (w / 2 - arm_w / 2), leg_h + (base_h + arm_h) / 2, 0]), "fabric")


def plant(p: _Parts, rng: Rng) -> None:
    """Potted plant or tree: pot, trunk, foliage balls or cones."""
    pot_r, pot_h = rng.uniform(0.12, 0.25), rng.uniform(0.15, 0.35)
    p.add("pot", cone(pot_r * 0.75, pot_h, [0, 0, 0], top_radius=pot_r), "pot")
    trunk_h = rng.uniform(0.3, 1.0)
    p.add("trunk", cylinder(rng.uniform(0.02, 0.05), trunk_h, [0, pot_h + trunk_h / 2 - 0.05, 0]), "bark")
    top = pot_h + trunk_h - 0.05
    if rng.random() < 0.4:
        for k in range(int(rng.integers(1, 4))):
            r = rng.uniform(0.2, 0.35) * (1 - 0.25 * k)
            p.add(f"foliage_{k}", cone(r, r * 1.4, [0, top - 0.1 + k * r * 0.8, 0]), "leaf")
    else:
        for k in range(int(rng.integers(1, 6))):
            offset = rng.uniform(-0.15, 0.15, size=3) * (k > 0)
            p.add(f"foliage_{k}", sphere(rng.uniform(0.12, 0.25), [offset[0], top + 0.1 + offset[1], offset[2]]), "leaf")


def stool(p: _Parts, rng: Rng) -> None:
    """Round seat on three or four splayed-free legs with an optional foot ring."""
    h, r = rng.uniform(0.45, 0.8), rng.uniform(0.15, 0.22)
    seat_t = rng.uniform(0.03, 0.06)
    p.add("seat", cylinder(r, seat_t, [0, h + seat_t / 2, 0]), "seat")
    legs = int(rng.integers(3, 5))
    for k in range(legs):
        a = 2 * math.pi * k / legs
        p.add(f"leg_{k}", cylinder(0.018, h, [0.75 * r * math.cos(a), h / 2, 0.75 * r * math.sin(a)]), "metal")
    if rng.random() < 0.6:
        p.add("foot_ring", torus(0.75 * r, 0.012, [0, h * 0.35, 0]), "metal")


def mug(p: _Parts, rng: Rng) -> None:
    """Cup body and handle, optionally a saucer (two or three parts)."""
    r, h = rng.uniform(0.04, 0.06), rng.uniform(0.08, 0.12)
    p.add("body", cylinder(r, h, [0, h / 2 + 0.008, 0]), "ceramic")
    p.add("handle", torus(h * 0.28, 0.008, [r + h * 0.12, h / 2 + 0.008, 0], axis="z"), "ceramic")
    if rng.random() < 0.4:
        p.add("saucer", cylinder(r * 1.8, 0.008, [0, 0.004, 0]), "saucer")


def airplane(p: _Parts, rng: Rng) -> None:
    """Fuselage, wings, tail fin, stabilisers and optional engines."""
    length, fr = rng.uniform(2.0, 3.5), rng.uniform(0.12, 0.2)
    y = 0.3
    p.add("fuselage", capsule(fr, length, [0, y, 0], axis="z"), "paint")
    span, chord = length * rng.uniform(0.8, 1.2), rng.uniform(0.25, 0.45)
    for sx in (-1, 1):
        p.add(f"wing_{'left' if sx < 0 else 'right'}", box([span / 2, 0.03, chord], [sx * span / 4, y, 0.05]), "paint")
    p.add("tail_fin", box([0.03, fr * 2.5, chord * 0.7], [0, y + fr * 1.5, -length / 2 + chord * 0.4]), "paint")
    for sx in (-1, 1):
        p.add(f"stabilizer_{'left' if sx < 0 else 'right'}", box([span * 0.18, 0.025, chord * 0.5], [sx * span * 0.09, y + 0.02, -length / 2 + chord * 0.35]), "paint")
    engines = int(rng.choice([0, 2, 4]))
    for k in range(engines):
        sx = -1 if k % 2 == 0 else 1
        x = sx * span * (0.15 + 0.12 * (k // 2))
        p.add(f"engine_{k}", cylinder(fr * 0.45, chord * 0.9, [x, y - 0.1, 0.15], axis="z"), "metal")


CATEGORIES: dict[str, Callable[[_Parts, Rng], None]] = {
    "chair": chair, "table": table, "lamp": lamp, "shelf": shelf, "vehicle": vehicle, "figure": figure,
    "bed": bed, "sofa": sofa, "plant": plant, "stool": stool, "mug": mug, "airplane": airplane,
}


# ----------------------------------------------------------------------------- assets


def _material_colors(rng: Rng, materials: list[str]) -> dict[str, np.ndarray]:
    """One random RGBA colour per distinct material key, in order of appearance."""
    colors = {}
    for key in dict.fromkeys(materials):
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.25, 0.8), rng.uniform(0.45, 0.95))
        colors[key] = np.array([*(np.asarray(rgb) * 255).round(), 255], dtype=np.uint8)
    return colors


def generate_object(seed: int, index: int, category: str | None = None) -> ProceduralAsset:
    """Object `index` of the stream `seed` (both >= 0): a random (or the given) category, 2-32 named parts."""
    if seed < 0 or index < 0:
        raise ConfigError(f"procedural seed and index must be >= 0, got seed {seed}, index {index}")
    rng = np.random.default_rng([seed, index, 0])
    names = sorted(CATEGORIES)
    category = category or names[int(rng.integers(len(names)))]
    if category not in CATEGORIES:
        raise ConfigError(f"unknown procedural category '{category}' (choose from {', '.join(names)})")
    parts = _Parts()
    CATEGORIES[category](parts, rng)
    colors = _material_colors(rng, parts.materials)
    return ProceduralAsset(
        id=f"object_s{seed}_{index:06d}", kind="object", category=category, meshes=parts.meshes,
        names=parts.names, colors=np.stack([colors[m] for m in parts.materials]),
    )


def _place_objects(rng: Rng, footprints: np.ndarray, gap: float = 0.05) -> np.ndarray:
    """Non-overlapping xz centres (n, 2) for discs of the given radii, largest placed first."""
    n = len(footprints)
    side = math.sqrt(math.pi * (footprints + gap) ** 2 @ np.ones(n) / 0.45)  # ~45 % of the floor covered
    centres = np.zeros((n, 2))
    placed: list[int] = []
    for i in np.argsort(-footprints):
        for attempt in range(200):
            grow = 1.0 + attempt / 100  # widen the floor if it is crowded
            c = rng.uniform(-side * grow / 2, side * grow / 2, size=2)
            if all(np.linalg.norm(c - centres[j]) >= footprints[i] + footprints[j] + gap for j in placed):
                break
        centres[i] = c
        placed.append(int(i))
    return centres


def check_scene_objects(min_objects: int, max_objects: int) -> None:
    """A procedural scene's object-count range is within 2..MAX_PARTS (one-line ConfigError)."""
    if not 2 <= min_objects <= max_objects <= MAX_PARTS:
        raise ConfigError(f"scenes hold 2 to {MAX_PARTS} objects, got {min_objects} to {max_objects} (--scene-objects MIN MAX)")


def generate_scene(seed: int, index: int, num_objects: int | None = None, max_objects: int = 16, min_objects: int = 2) -> ProceduralAsset:
    """Scene `index` of the stream `seed`: `min_objects`-`max_objects` objects (one component each) on a floor y = 0."""
    check_scene_objects(min_objects, max_objects)
    if num_objects is not None:  # (0 and 1 took the random count, 100 built a scene no model here takes)
        check_scene_objects(num_objects, num_objects)
    rng = np.random.default_rng([seed, index, 1])
    n = num_objects or int(rng.integers(min_objects, max_objects + 1))
    meshes, names, colors = [], [], []
    for k in range(n):
        obj = generate_object(seed, index * 1000 + k + 10**9)  # a stream disjoint from the object set
        mesh = trimesh.util.concatenate(obj.meshes)
        mesh.apply_transform(trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * math.pi), [0, 1, 0]))
        height = float(rng.uniform(0.5, 1.4))
        mesh.apply_scale(height / max(mesh.extents.max(), 1e-6))
        mesh.apply_translation([-mesh.bounds.mean(0)[0], -mesh.bounds[0, 1], -mesh.bounds.mean(0)[2]])
        meshes.append(mesh)
        names.append(f"{obj.category}_{k}")
        areas = [m.area for m in obj.meshes]
        colors.append(obj.colors[int(np.argmax(areas))])  # the colour of its largest part
    radii = np.array([np.linalg.norm(m.vertices[:, [0, 2]], axis=1).max() for m in meshes])
    for mesh, (x, z) in zip(meshes, _place_objects(rng, radii)):
        mesh.apply_translation([x, 0, z])
    return ProceduralAsset(
        id=f"scene_s{seed}_{index:06d}", kind="scene", category="scene", meshes=meshes, names=names,
        colors=np.stack(colors),
    )


def generate(kind: str, seed: int, index: int, **kwargs) -> ProceduralAsset:
    """Dispatch on kind: 'objects' / 'object' or 'scenes' / 'scene'."""
    if kind in ("object", "objects"):
        return generate_object(seed, index, **kwargs)
    if kind in ("scene", "scenes"):
        return generate_scene(seed, index, **kwargs)
    raise ConfigError(f"unknown procedural kind '{kind}' (objects or scenes)")
