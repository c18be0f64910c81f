"""Drafter registry: a `--drafter` spec string names a factory; nothing else asks which drafter it has."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import MtpspecError
from .base import DecodeState, Draft, Drafter, NoDrafter
from .ngram import NgramDrafter

Factory = Callable[[str, "object"], Drafter]  # (argument after the colon, target) -> drafter


def _none(arg: str, target) -> Drafter:
    return NoDrafter()


def _ngram(arg: str, target) -> Drafter:
    return NgramDrafter(max_n=int(arg)) if arg else NgramDrafter()


def _draft_model(arg: str, target) -> Drafter:
    from ..models import load_hf
    from .draft_model import DraftModelDrafter

    if not arg:
        raise MtpspecError("--drafter draft: needs a model, e.g. draft:smollm2-135m or draft:/path/to/model")
    model, tokenizer = load_hf(arg, dtype=target.dtype)
    drafter = DraftModelDrafter(model, tokenizer)
    drafter.check_compatible(target)
    return drafter


def _mtp(arg: str, target) -> Drafter:
    from ..mtp import load_drafter
    from .mtp import MtpDrafter

    if not arg:
        raise MtpspecError(
            f"--drafter mtp: needs a drafter directory, e.g. mtp:drafters/my-drafter (shipped ones: {', '.join(shipped()) or 'none'})"
        )
    return MtpDrafter(load_drafter(arg, dtype=target.dtype), target)


def _hybrid(arg: str, target) -> Drafter:
    from .hybrid import HybridDrafter

    if not arg:
        raise MtpspecError(
            f"--drafter hybrid: needs an MTP drafter directory, e.g. hybrid:drafters/my-drafter (shipped ones: {', '.join(shipped()) or 'none'})"
        )
    return HybridDrafter(_mtp(arg, target))


REGISTRY: dict[str, Factory] = {"none": _none, "ngram": _ngram, "draft": _draft_model, "mtp": _mtp, "hybrid": _hybrid}
MTP_KINDS = (
    "mtp",
    "hybrid",
)  # kinds that take an MTP drafter directory; without one, the drafter shipped for the model
AUTO = "auto"  # `hybrid` with the MTP drafter shipped for the model, `ngram` for a model without one
DEFAULT = AUTO  # the fastest measured for the bundled targets on CPUs (docs/benchmarks.md)
SHIPPED = Path(__file__).parent / "shipped"  # MTP drafters trained by mtpspec for the bundled targets


def shipped() -> dict[str, Path]:
    """Bundled target name → directory of the MTP drafter shipped for it."""
    return {p.name: p for p in sorted(SHIPPED.glob("*")) if (p / "config.json").is_file()}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split "kind:arg" and check the kind exists (cheap: call it before loading any model)."""
    kind, _, arg = spec.partition(":")
    if spec == AUTO:
        return kind, arg
    if kind not in REGISTRY:
        names = ", ".join([AUTO] + [k + (":PATH" if k in ("draft", *MTP_KINDS) else "") for k in REGISTRY])
        raise MtpspecError(f"unknown drafter {spec!r}: use one of {names}")
    return kind, arg


def resolve_spec(spec: str, model: str) -> str:
    """The spec to build for target `model`: `mtp` or `hybrid` without a path names the drafter shipped for a bundled
    target, and `auto` is `hybrid` with that drafter, or `ngram` where none is shipped."""
    path = shipped().get(model)
    if spec == AUTO:
        return f"hybrid:{path}" if path else "ngram"
    kind = spec.rstrip(":")
    if kind in MTP_KINDS and path:
        return f"{kind}:{path}"
    return spec


def make_drafter(spec: str, target) -> Drafter:
    """Build the drafter that `spec` ("none", "ngram", "draft:PATH", ...) names, for `target`."""
    kind, arg = parse_spec(spec)
    if kind == AUTO:
        raise MtpspecError(
            "the drafter `auto` depends on the model's name: resolve it with resolve_spec(spec, model) first"
        )
    return REGISTRY[kind](arg, target)


__all__ = [
    "AUTO",
    "DEFAULT",
    "REGISTRY",
    "DecodeState",
    "Draft",
    "Drafter",
    "make_drafter",
    "parse_spec",
    "resolve_spec",
    "shipped",
]
