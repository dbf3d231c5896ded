"""A small PyTorch CNN (CPU) served over HTTP, batched and unbatched.

The model is the seed article's SimpleCNN (conv 3->16, stride 2, over 32x32 RGB images) with
a 2048-unit dense head before the 10 logits, and seeded random weights so it needs no
download. The dense head is what makes batching pay on a CPU: its 29 MB of weights are read
once per forward pass, whatever the batch size. Images travel as base64 float32
(`{"image_b64": ...}`) or as a JSON list (`{"image": [...]}`). Two deployments serve it:

- `batched_app`: `@serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005,
  max_concurrent_batches=2)`, one forward pass per batch;
- `unbatched_app`: one forward pass per request.

Both run the forward pass in a thread (torch releases the GIL), so the replica's event loop
keeps receiving requests meanwhile and both can use the machine's cores.

    flotilla run examples.torch_cnn:batched_app
    python examples/torch_cnn.py --request     # prints one prediction over HTTP

Needs `pip install torch==2.13.0` (CPU build).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from flotilla import serve

IMAGE_SHAPE = (3, 32, 32)


def build_model() -> Any:
    import torch
    from torch import nn

    class SimpleCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, stride=2)
            self.hidden = nn.Linear(16 * 15 * 15, 2048)
            self.fc = nn.Linear(2048, 10)

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.conv(x))
            x = torch.relu(self.hidden(x.view(x.size(0), -1)))
            return self.fc(x)

    torch.manual_seed(0)
    model = SimpleCNN()
    model.eval()
    return model


def decode(body: dict[str, Any]) -> Any:
    """One image as a float32 numpy array of shape (3, 32, 32)."""
    import base64

    import numpy as np

    if "image_b64" in body:
        arr = np.frombuffer(base64.b64decode(body["image_b64"]), dtype=np.float32)
    else:
        arr = np.asarray(body["image"], dtype=np.float32)
    return arr.reshape(IMAGE_SHAPE)


def _to_tensor(images: list[Any]) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.stack(images))


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class BatchedClassifier:
    def __init__(self) -> None:
        self.model = build_model()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def classify(self, images: list[Any]) -> list[dict[str, Any]]:
        # The forward pass runs in a thread (torch releases the GIL), so the replica keeps
        # receiving the next batch's requests meanwhile.
        top = await asyncio.get_running_loop().run_in_executor(None, self._forward, images)
        return [{"class": c, "batch_size": len(images)} for c in top]

    def _forward(self, images: list[Any]) -> list[int]:
        import torch

        with torch.no_grad():
            probs = torch.softmax(self.model(_to_tensor(images)), dim=1)
        return probs.argmax(dim=1).tolist()

    async def __call__(self, request: Request) -> dict[str, Any]:
        return await self.classify(decode(await request.json()))


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class UnbatchedClassifier:
    def __init__(self) -> None:
        self.model = build_model()

    async def __call__(self, request: Request) -> dict[str, Any]:
        image = decode(await request.json())
        top = await asyncio.get_running_loop().run_in_executor(None, self._forward, [image])
        return {"class": top[0], "batch_size": 1}

    def _forward(self, images: list[Any]) -> list[int]:
        import torch

        with torch.no_grad():
            probs = torch.softmax(self.model(_to_tensor(images)), dim=1)
        return probs.argmax(dim=1).tolist()


batched_app = BatchedClassifier.bind()
unbatched_app = UnbatchedClassifier.bind()


def sample_image(seed: int = 0) -> list[float]:
    import random

    rng = random.Random(seed)
    return [round(rng.random(), 3) for _ in range(3 * 32 * 32)]


def sample_body(seed: int = 0) -> dict[str, str]:
    import base64

    import numpy as np

    arr = np.asarray(sample_image(seed), dtype=np.float32)
    return {"image_b64": base64.b64encode(arr.tobytes()).decode()}


if __name__ == "__main__":
    import json
    import sys
    import urllib.request

    if "--request" in sys.argv:
        body = json.dumps(sample_body()).encode()
        req = urllib.request.Request("http://127.0.0.1:8000/", data=body, headers={"content-type": "application/json"})
        print(urllib.request.urlopen(req).read().decode())
