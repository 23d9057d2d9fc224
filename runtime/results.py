"""What a request returns, shared by ``Runtime``, ``Session`` and ``VideoStream`` (kept apart from all three
so none of them imports another): ``RunResult``, ``collect`` (events → result) and ``sampling_params``."""

from __future__ import annotations

from dataclasses import dataclass

from nvila_edge.errors import GenerationError
from nvila_edge.events import FinishEvent, GenerationResult
from nvila_edge.sampling import SamplingParams

from .planner import PlanEvent


@dataclass
class RunResult(GenerationResult):
    """``GenerationResult`` plus the media plan the runtime chose (tiling, tiles, dropped frames)."""

    plan: PlanEvent | None = None


def sampling_params(sampling: dict) -> SamplingParams:
    try:
        return SamplingParams(**sampling)
    except TypeError as e:
        raise GenerationError(f"unknown sampling argument: {e}") from None


def collect(events) -> RunResult:
    plan = final = None
    for ev in events:
        if isinstance(ev, PlanEvent):
            plan = ev
        elif isinstance(ev, FinishEvent):
            final = ev
    if final is None:
        raise GenerationError("the generation ended without a finish event")
    return RunResult(final.text, final.token_ids, final.reason, final.usage, final.timings, plan)
