"""Record EfficientNet-Lite0's ImageNet logits for a few synthetic images, as the installed
package's own network computes them (unfused BatchNorms, its own forward), into
tests/fixtures/efficientnet_lite0_logits.json. tests/unit/test_projected.py checks distgan's
feature network (BatchNorms folded, stages split, weights as buffers) against it.

    python tools/make_feature_net_fixture.py     (from the repository root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the inputs live in the test

from distgan.models.feature_net import WEIGHTS_SHA256, weights_file  # noqa: E402
from tests.unit.test_projected import FIXTURE as OUT  # noqa: E402
from tests.unit.test_projected import synthetic_images  # noqa: E402


def main() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(weights_file(), map_location="cpu", weights_only=True))
    with torch.no_grad():
        logits = net.eval()(synthetic_images())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"weights_sha256": WEIGHTS_SHA256, "made_by": "tools/make_feature_net_fixture.py",
                               "top5": logits.topk(5).indices.tolist(),
                               "logits": [[round(v, 6) for v in row] for row in logits.tolist()]}))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); top-1 {logits.argmax(1).tolist()}")


if __name__ == "__main__":
    main()
