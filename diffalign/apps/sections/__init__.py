"""The demo's method sections: one function per method, `section(ctx: DemoContext) -> SectionResult`, that runs the
method on the toy world and measures it with the base evaluation's seeds. A new method adds its module here and one
line in SECTIONS; the demo, its report and the acceptance scripts iterate over them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    title: str
    function: str
    """module:function of the section (imported when it runs)."""


SECTIONS: dict[str, Section] = {
    "dpo": Section("Diffusion-DPO", "diffalign.apps.sections.dpo:dpo_section"),
    "inpo": Section("DDIM-InPO", "diffalign.apps.sections.inpo:inpo_section"),
    "alignprop": Section("AlignProp", "diffalign.apps.sections.alignprop:alignprop_section"),
    "reno": Section("ReNO", "diffalign.apps.sections.reno:reno_section"),
    "rlg": Section("RL guidance (RLG)", "diffalign.apps.sections.rlg:rlg_section"),
}


def section(key: str) -> Callable:
    """The section function of method `key`."""
    module, _, name = SECTIONS[key].function.partition(":")
    return getattr(importlib.import_module(module), name)
