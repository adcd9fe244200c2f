"""Meta-device init: no rank ever materializes the whole model, and the result equals an ordinary model.

``TawPipeStrategy(meta_init=True)`` builds the LitGPT model in ``configure_model`` on the meta device; each owner
initializes only its chunk, straight into its master buffer, from name-seeded generators. The multi-rank test uses a
model of ~265 MB (fp32) on 4 ranks and measures each process's peak RSS growth from before ``configure_model`` to
``on_fit_start``: DDP (which must hold everything) grows by the whole model, TawPipe by about a quarter of it. The
same run trains exactly like DDP started from the same name-seeded initialization.
"""

import pytest
import torch
from torch import nn

from lightning_tawpipe import init

BIG = ("--steps", "2", "--lr", "3e-3", "--seq_length", "16", "--batch_size", "2", "--n_layer", "8", "--n_embd", "768",
       "--n_head", "12", "--n_query_groups", "4", "--devices", "4")


def test_meta_init_holds_one_chunk_per_rank_and_matches_ddp(train_job):
    result = train_job(*BIG, "--strategy", "tawpipe", "--group_size", "2", "--meta_init")
    reference = train_job(*BIG, "--strategy", "ddp", "--seeded_init")
    for step, (x, y) in enumerate(zip(result["losses"], reference["losses"])):
        assert abs(x - y) <= 1e-5 * abs(y), f"step {step}: loss {x} vs ddp {y}"
    model_mb = result["n_params"] * 4 / 2**20
    assert model_mb > 250
    assert min(reference["setup_peak_growth_mb"]) >= 0.9 * model_mb  # the measurement sees a full materialization
    for rank, growth in enumerate(result["setup_peak_growth_mb"]):
        assert growth <= 0.4 * model_mb, f"rank {rank} grew by {growth:.0f} MB during setup (model {model_mb:.0f} MB)"


def test_pretrained_weights_load_by_the_chunk(train_job, tmp_path):
    """``TawPipeStrategy(meta_init=True, init_weights="lit_model.pth")``: each owner copies only its chunk out of the
    memory-mapped LitGPT file (GPT-relative keys); training equals ddp started from the same file."""
    from litgpt import GPT

    from lightning_tawpipe.module import tiny_llama_config

    torch.manual_seed(5)
    path = tmp_path / "lit_model.pth"
    torch.save(GPT(tiny_llama_config(n_layer=4, n_embd=32, block_size=32)).state_dict(), path)
    args = ("--n_layer", "4", "--n_embd", "32", "--seq_length", "32", "--steps", "3", "--devices", "4",
            "--init_weights", str(path))
    result = train_job(*args, "--strategy", "tawpipe", "--group_size", "2", "--meta_init")
    reference = train_job(*args, "--strategy", "ddp")
    for step, (x, y) in enumerate(zip(result["losses"], reference["losses"])):
        assert abs(x - y) <= 1e-5 * abs(y), f"step {step}: loss {x} vs ddp {y}"
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(result["state_dict"][name], ref, rtol=0, atol=1e-4, msg=name)


def _tiny_gpt(device=None):
    from litgpt import GPT

    from lightning_tawpipe.module import tiny_llama_config

    with torch.device(device or "cpu"):
        return GPT(tiny_llama_config(n_layer=2, n_embd=32))


def test_materialize_equals_seeded_reset_of_an_ordinary_model():
    eager = _tiny_gpt()
    init.seeded_reset_parameters(eager, seed=7, prefix="model")
    meta = _tiny_gpt("meta")
    assert init.has_meta_tensors(meta)
    init.materialize(meta, torch.device("cpu"), seed=7, prefix="model")
    assert not init.has_meta_tensors(meta)
    for (name, a), b in zip(eager.state_dict().items(), meta.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # name-seeded: each module draws from its own generator, so blocks differ from each other
    assert not torch.equal(eager.transformer.h[0].attn.qkv.weight, eager.transformer.h[1].attn.qkv.weight)


def test_placeholder_keeps_shape_for_configure_optimizers_but_no_memory():
    p = nn.Parameter(torch.empty(64, 32, device="meta"))
    init.swap_in(p, init.placeholder(p, torch.device("cpu")))
    assert p.shape == (64, 32) and p.ndim == 2 and p.device.type == "cpu"
    assert p.untyped_storage().nbytes() == 4


def test_meta_module_without_reset_parameters_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

    with torch.device("meta"):
        module = Scale()
    with pytest.raises(TypeError, match="reset_parameters"):
        init.materialize(module, torch.device("cpu"), seed=0, prefix="scale")
