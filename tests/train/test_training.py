"""End-to-end training on a real local Ray cluster with the tiny random Llama."""

import subprocess
import sys
import textwrap

import pytest
import torch

from ftray.eval.loading import load_checkpoint
from tests.train.helpers import logged, train_tiny


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


PLAIN_LOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    path, kind = sys.argv[1], sys.argv[2]
    if kind == "adapter":
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    assert "ftray" not in sys.modules
    ids = torch.arange(3, 19).unsqueeze(0)
    torch.save(model.eval()(input_ids=ids).logits, sys.argv[3])
""")


def assert_loads_without_ftray(final, kind, tmp_path):
    out = tmp_path / f"{kind}.pt"
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(final), kind, str(out)], check=True)
    model, _ = load_checkpoint(final, merge=False)
    expected = logits_of(model.eval(), torch.arange(3, 19).unsqueeze(0))
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-5, atol=1e-5)


def test_lora_ddp_two_workers_learns_and_exports_a_peft_adapter(ray_local, tiny_model_dir, tmp_path):
    # 5 eval rows over 2 ranks: uneven shards once deadlocked the eval collectives.
    result = train_tiny(tiny_model_dir, tmp_path, "ddp", train={"max_steps": 30, "eval_every": 10},
                        data={"eval_max_samples": 5}, scaling={"num_workers": 2})
    losses = logged(result.run_dir)
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1]
    assert (result.final_dir / "adapter_model.safetensors").exists()
    assert (result.final_dir / "ftray_spec.yaml").exists() and not (result.final_dir / "train_state.pt").exists()
    assert_loads_without_ftray(result.final_dir, "adapter", tmp_path)


def test_full_finetune_exports_safetensors_loadable_by_transformers(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(tiny_model_dir, tmp_path, "full", methods=[{"name": "full"}], train={"max_steps": 4})
    assert (result.final_dir / "model.safetensors").exists()
    assert_loads_without_ftray(result.final_dir, "full", tmp_path)


def test_fsdp_losses_match_ddp_in_fp32(ray_local, tiny_model_dir, tmp_path):
    common = dict(methods=[{"name": "full"}], train={"max_steps": 6, "precision": "fp32", "lr": 1e-3})
    ddp = train_tiny(tiny_model_dir, tmp_path, "ddp", scaling={"num_workers": 2, "strategy": "ddp"}, **common)
    fsdp = train_tiny(tiny_model_dir, tmp_path, "fsdp", scaling={"num_workers": 2, "strategy": "fsdp"}, **common)
    a, b = logged(ddp.run_dir), logged(fsdp.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    # The sharded run's gathered checkpoint equals the replicated one's.
    wa, _ = load_checkpoint(ddp.final_dir)
    wb, _ = load_checkpoint(fsdp.final_dir)
    for (n, p), (_, q) in zip(wa.named_parameters(), wb.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_packed_run_logs_to_offline_wandb(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    result = train_tiny(tiny_model_dir, tmp_path, "packed", data={"packing": True}, train={"max_steps": 4},
                        tracking={"wandb": True, "project": "ftray-test"})
    assert sorted(logged(result.run_dir)) == [1, 2, 3, 4]
    assert list((result.run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_smollm2_two_workers_lora_masked_thought(ray_local, tmp_path):
    result = train_tiny(
        "smollm2-135m", tmp_path, "smol",
        data={"max_samples": 16, "eval_max_samples": 4, "max_len": 224},
        methods=[{"name": "lora", "r": 4}, {"name": "masked_thought", "p": 0.2}],
        train={"max_steps": 3, "batch_size": 2, "log_every": 1},
        scaling={"num_workers": 2},
    )
    losses = logged(result.run_dir)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())
    assert_loads_without_ftray(result.final_dir, "adapter", tmp_path)
