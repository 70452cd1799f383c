"""Token-reduction methods: each decides *which* tokens stay, go or merge (a plan); the passes apply
the plan to every per-token tensor. Adding a method means adding one file and one registry line."""

from __future__ import annotations

from ..errors import TokenCompileError
from .base import Method, Plan, PruneMethod, SiteInputs
from .dart import DART
from .divprune import DivPrune
from .evit import EViT
from .pitome import PiToMe
from .random import RandomPrune
from .tofu import ToFu
from .tome import ToMe
from .visionzip import VisionZip
from .zipcache import ZipCache

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (ToMe, PiToMe, ToFu, EViT, VisionZip, DART, DivPrune, ZipCache, RandomPrune)}


def get_method(name: str, options: dict[str, str] | None = None) -> Method:
    if name not in METHODS:
        raise TokenCompileError(f"unknown method {name!r}",
                                f"choose one of: {', '.join(sorted(METHODS))} (see `tokencompile methods`)")
    return METHODS[name](**Method.parse_options(METHODS[name], options or {}))


__all__ = ["METHODS", "Method", "Plan", "PruneMethod", "SiteInputs", "get_method"]
