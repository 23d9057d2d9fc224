"""Print the tiling plan and visual-token budget of an image for every real NVILA preset.

    python samples/plan_image.py samples/assets/shapes_1280x720.jpg

Uses only the public API (no model weights needed).
"""

import sys

from nvila_edge import NVILAConfig
from nvila_edge.media import load_image, plan_image


def main(path: str) -> None:
    image = load_image(path)
    for preset in ("nvila-8b", "nvila-lite-2b", "nvila-lite-8b"):
        plan = plan_image(image.size, NVILAConfig.from_preset(preset))
        print(f"[{preset}] {plan.num_tiles} tiles → {plan.num_tokens} visual tokens")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "samples/assets/shapes_1280x720.jpg")
