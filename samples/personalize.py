"""Teach the model a new object from a few pictures, then redeploy: fine-tune (QLoRA + ViT-LayerNorm), merge,
re-calibrate, re-export the bundle, and compare the answer before and after.

    python samples/personalize.py mug1.jpg mug2.jpg mug3.jpg mug4.jpg --label "my blue mug"
    python samples/personalize.py --label zorbo              # no pictures: draws a made-up robot "zorbo"

Base model: the cached demo checkpoint (`nvila-edge demo` makes it) or --checkpoint DIR. Same as
``nvila-edge personalize``; prints the answers, each step's time and the peak memory.
"""

import argparse
import random
import sys

from PIL import Image, ImageDraw

from nvila_edge.pipelines.personalize import PersonalizeConfig, personalize


def draw_robot(seed: int, size: int = 224) -> Image.Image:
    """A boxy robot (head, eyes, antenna, body) at a random place on a random background."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 120) for _ in range(3)))
    d = ImageDraw.Draw(img)
    s = rng.randint(size // 4, size // 3)
    x, y = rng.randint(5, size - s - 5), rng.randint(s // 2 + 5, size - 2 * s - 5)
    d.rectangle([x, y, x + s, y + s], fill=(190, 190, 200))  # head
    for ex in (x + s // 4, x + 3 * s // 4):
        d.ellipse([ex - s // 10, y + s // 3, ex + s // 10, y + s // 3 + s // 5], fill=(0, 220, 255))
    d.line([x + s // 2, y, x + s // 2, y - s // 2], fill=(255, 80, 80), width=3)  # antenna
    d.rectangle([x - s // 4, y + s, x + s + s // 4, y + 2 * s], fill=(120, 120, 150))  # body
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="on-device personalization loop")
    p.add_argument("images", nargs="*", help="pictures of the object (default: 5 drawn robots)")
    p.add_argument("--label", default="zorbo")
    p.add_argument("--checkpoint", help="base checkpoint (default: the cached demo model)")
    p.add_argument("-o", "--output", default="personalized")
    p.add_argument("--steps", type=int, default=PersonalizeConfig.steps)
    args = p.parse_args(argv)
    images = args.images or [draw_robot(seed) for seed in range(5)]
    result = personalize(images, args.label, args.output, checkpoint=args.checkpoint,
                         config=PersonalizeConfig(steps=args.steps))
    print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
