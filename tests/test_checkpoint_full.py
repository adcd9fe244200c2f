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


def _same(resumed: dict, reference: dict, steps: int) -> None:
    assert len(resumed["losses"]) == len(reference["losses"]) == steps
    for x, y in zip(resumed["losses"], reference["losses"]):
        assert abs(x - y) <= 1e-5 * abs(y)
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], ref, rtol=0, atol=1e-4, msg=name)


def test_ddp_file_resumes_under_tawpipe_whose_full_file_resumes_under_both(train_job, tmp_path):
    """One chain against one uninterrupted ddp run of 9 steps (checkpointed every 3): TawPipe resumes that run's
    step-3 file and writes its own full file at step 6, which resumes under TawPipe and under ddp alike to step 9.
    Every resumed segment must reproduce the uninterrupted run's losses (and its step-6 / step-9 weights)."""
    ddp_dir, taw_ckpt = str(tmp_path / "ddp"), str(tmp_path / "tawpipe.ckpt")
    straight = train_job(*ARGS, "--strategy", "ddp", "--steps", "9", "--checkpoint_dir", ddp_dir, "--every_n_steps", "3")
    ddp_ckpt = os.path.join(ddp_dir, "epoch=0-step=3.ckpt")
    at_6 = torch.load(os.path.join(ddp_dir, "epoch=0-step=6.ckpt"), weights_only=True)["state_dict"]
    from_ddp = train_job(*ARGS, *TAWPIPE, "--steps", "6", "--resume", ddp_ckpt, "--save_ckpt", taw_ckpt)
    _same(from_ddp, {"losses": straight["losses"][3:6], "state_dict": at_6}, 3)

    saved = torch.load(taw_ckpt, weights_only=True)  # the trained weights, and the unsharded optimizer's layout
    for name, value in from_ddp["state_dict"].items():
        torch.testing.assert_close(saved["state_dict"][name], value, rtol=0, atol=0, msg=name)
    adam = saved["optimizer_states"][0]
    n_params = sum(len(g["params"]) for g in adam["param_groups"])
    assert n_params == len([k for k in saved["state_dict"] if not k.endswith((".cos", ".sin"))])
    assert len(adam["state"]) == n_params and all(int(s["step"]) == 6 for s in adam["state"].values())

    reference = {"losses": straight["losses"][6:9], "state_dict": straight["state_dict"]}
    _same(train_job(*ARGS, *TAWPIPE, "--steps", "9", "--resume", taw_ckpt), reference, 3)
    _same(train_job(*ARGS, "--strategy", "ddp", "--steps", "9", "--resume", taw_ckpt), reference, 3)
