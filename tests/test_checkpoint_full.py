"""Full (single-file) checkpoints: ``TawPipeStrategy(state_dict_type="full")``, and other strategies' files.

With ``state_dict_type="full"`` TawPipe gathers model weights and optimizer state into Lightning's ordinary
single-file format (optimizer state indexed as the unsharded optimizer would index it), so the file resumes under
TawPipe and under ``ddp`` alike. A ``ddp`` checkpoint file of the same model also loads into TawPipe. Checked:
resuming gives the same losses (1e-5 relative), and the file's weights are the trained weights.
"""

import os

import torch

ARGS = ("--n_layer", "4", "--n_embd", "32", "--seq_length", "32", "--lr", "3e-3", "--devices", "4")
TAWPIPE = ("--strategy", "tawpipe", "--group_size", "2", "--n_microbatches", "2", "--state_dict_type", "full")


def test_checkpoint_resumes_under_tawpipe_and_ddp(train_job, tmp_path):
    ckpt = str(tmp_path / "three-steps.ckpt")
    first = train_job(*ARGS, *TAWPIPE, "--steps", "3", "--save_ckpt", ckpt)
    saved = torch.load(ckpt, weights_only=True)
    for name, value in first["state_dict"].items():
        torch.testing.assert_close(saved["state_dict"][name], value, rtol=0, atol=0, msg=name)
    adam = saved["optimizer_states"][0]
    n_params = sum(len(g["params"]) for g in adam["param_groups"])
    assert n_params == len([k for k in saved["state_dict"] if not k.endswith((".cos", ".sin"))])
    assert len(adam["state"]) == n_params and all(int(s["step"]) == 3 for s in adam["state"].values())

    resumed = train_job(*ARGS, *TAWPIPE, "--steps", "6", "--resume", ckpt)
    reference = train_job(*ARGS, "--strategy", "ddp", "--steps", "6", "--resume", ckpt)
    assert len(resumed["losses"]) == len(reference["losses"]) == 3
    for x, y in zip(resumed["losses"], reference["losses"]):
        assert abs(x - y) <= 1e-5 * abs(y)
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], ref, rtol=0, atol=1e-4, msg=name)
    assert os.path.getsize(ckpt) > 0


def test_ddp_checkpoint_file_loads_into_tawpipe(train_job, tmp_path):
    ckpt = str(tmp_path / "ddp.ckpt")
    train_job(*ARGS, "--strategy", "ddp", "--steps", "3", "--save_ckpt", ckpt)
    resumed = train_job(*ARGS, *TAWPIPE, "--steps", "6", "--resume", ckpt)
    reference = train_job(*ARGS, "--strategy", "ddp", "--steps", "6", "--resume", ckpt)
    assert len(resumed["losses"]) == len(reference["losses"]) == 3
    for x, y in zip(resumed["losses"], reference["losses"]):
        assert abs(x - y) <= 1e-5 * abs(y)
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], ref, rtol=0, atol=1e-4, msg=name)
