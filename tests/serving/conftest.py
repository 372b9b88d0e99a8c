"""A real local Ray Serve on 127.0.0.1 serving the tiny model, a LoRA adapter on it, and the adapter merged.

One app for the module (Ray with 2 CPUs; the two model replicas take 0.5 CPU each, so the SmolLM2
test can add a 1-CPU replica), fp32 so batched and unbatched greedy decoding agree exactly.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import ray
import torch
from ray import serve

from serving.app import build_app

API_KEY = "sk-ftray-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_adapter(base_dir: Path, out: Path) -> Path:
    """A PEFT LoRA adapter on the tiny model with random non-zero B (so it changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


def tiny_config(tiny_model_dir: Path, adapter_dir: Path, port: int) -> dict:
    model = {"dtype": "float32", "num_cpus": 0.5, "max_batch_size": 8, "max_ongoing_requests": 16,
             "batch_wait_timeout_s": 0.05, "default_max_tokens": 12}
    return {
        "models": [
            {"name": "tiny", "path": str(tiny_model_dir), "adapters": {"lora": str(adapter_dir)}, **model},
            {"name": "tiny-merged", "path": str(adapter_dir), **model},
        ],
        "api_key": API_KEY, "host": "127.0.0.1", "port": port,
    }


@pytest.fixture(scope="module")
def serve_url(tiny_model_dir: Path, adapter_dir: Path) -> str:
    """Base URL of the running app; Serve (and Ray, if this fixture started it) stop after the module."""
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.shutdown()  # a Serve left running by another module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(tiny_config(tiny_model_dir, adapter_dir, port)), name="tiny", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    if started_ray:
        ray.shutdown()
