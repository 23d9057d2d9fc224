"""How a robot app embeds the SDK: a control loop that asks about each sensor frame and acts on a validated,
structured (JSON) answer — and falls back to a safe action when the answer is late, cancelled or malformed.

    python samples/robot_agent.py BUNDLE [--steps 10] [--hz 2] [--timeout 1.0]

The runtime lives in an ``Agent`` (its own worker thread): ``agent.ask(frame, question, timeout=...)``
returns a ``Future``; a newer frame's question cancels an answer still running for an older frame. The
control loop never blocks longer than one period. Sensor frames here are simulated (an obstacle drifting
across the camera's view); replace ``SimulatedCamera`` with your driver.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from nvila_edge.runtime import Runtime
from nvila_edge.apps.agent import Agent, AnswerFormatError, parse_json_answer

QUESTION = ('Where is the red obstacle? Reply with JSON only: {"action": "forward" | "left" | "right" | "stop", '
            '"confidence": 0..1}')
SCHEMA = {"action": {"forward", "left", "right", "stop"}, "confidence": float}
SAFE = {"action": "stop", "confidence": 0.0}


class SimulatedCamera:
    """A 160x120 RGB view with a red square drifting from left to right."""

    def __init__(self, size=(160, 120)):
        self.w, self.h = size
        self.t = 0

    def read(self) -> np.ndarray:
        frame = np.full((self.h, self.w, 3), 90, np.uint8)
        x = (12 * self.t) % (self.w - 24)
        frame[self.h // 2 - 12:self.h // 2 + 12, x:x + 24] = (220, 30, 30)
        self.t += 1
        return frame


def decide(future, wait_s: float) -> tuple[dict, str]:
    """The validated action and where it came from ("model" or why we fell back)."""
    try:
        result = future.result(timeout=wait_s)
    except TimeoutError:
        return SAFE, "fallback: no answer in time"
    except Exception as e:  # cancelled (a newer frame), or a runtime error
        return SAFE, f"fallback: {type(e).__name__}"
    try:
        return parse_json_answer(result.text, SCHEMA), "model"
    except AnswerFormatError as e:
        return SAFE, f"fallback: invalid answer ({e})"


def control_loop(agent: Agent, camera, steps: int, hz: float, timeout: float, act=print) -> dict:
    """Each period: read a frame, ask, act on the answer (or the safe action). Returns counts."""
    period, counts = 1.0 / hz, {"model": 0, "fallback": 0}
    for step in range(steps):
        t0 = time.monotonic()
        tokens = []
        future = agent.ask(camera.read(), QUESTION, timeout=timeout, on_event=lambda ev: tokens.append(ev))
        action, source = decide(future, wait_s=max(period, timeout))
        counts["model" if source == "model" else "fallback"] += 1
        act(f"step {step}: {action['action']:7s} (confidence {action['confidence']:.2f}) ← {source}; "
            f"{len(tokens)} events in {1000 * (time.monotonic() - t0):.0f} ms")
        time.sleep(max(0.0, period - (time.monotonic() - t0)))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="robot control loop on a bundle")
    p.add_argument("bundle")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hz", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=1.0, help="seconds an answer may take before the safe action")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    with Runtime.load(args.bundle, threads=args.threads) as rt, Agent(rt, max_new_tokens=24) as agent:
        counts = control_loop(agent, SimulatedCamera(), args.steps, args.hz, args.timeout)
    print(f"{args.steps} steps: {counts['model']} acted on the model's answer, {counts['fallback']} safe fallbacks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
