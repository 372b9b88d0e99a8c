"""The loop's loss equals transformers' own causal-LM loss, though it computes logits only where labels are."""

import torch

from ftray.data import collate, load_rows, tokenize_dataset
from ftray.models import load_model
from ftray.train.loss import forward_and_loss


def test_loss_on_label_positions_equals_full_logits_loss(tiny_model_dir, tiny_tokenizer):
    ds = load_rows("bundled:arithmetic", "train", 6)
    rows = tokenize_dataset(ds, tiny_tokenizer, "cot", 256).to_list()
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    model = load_model(str(tiny_model_dir))
    out, loss_sum, count = forward_and_loss(model, dict(batch), amp=None)
    assert out.logits.shape[1] < batch["input_ids"].shape[1]  # prompt positions were skipped
    reference = model(**batch, use_cache=False).loss  # token-mean over the same label tokens
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-6)
