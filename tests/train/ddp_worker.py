"""Run by test_trainer under torchrun (2 CPU processes, gloo): train the toy stage a few
steps and write each replica's parameters, so the test can compare them."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.train.helpers import flat_params, toy_builder, toy_recipe  # noqa: E402
from setok_cli.train.trainer import Trainer  # noqa: E402


def main():
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    seen = []
    t = Trainer(toy_recipe(data, out, max_steps=4, checkpoint_every=2), builder=toy_builder,
                hooks={"after_step": lambda tr: None})
    orig = t._batches

    def spy():
        for b in orig():
            seen.extend(b["index"].tolist())
            yield b
    t._batches = spy
    t.train()
    acc = t.accelerator
    # the alignment losses gather features from every process, keeping the local gradient
    from setok_cli.models.alignment import gather_with_grad, image_text_infonce
    r = acc.process_index
    feats = torch.full((2 + r, 3), float(r), requires_grad=True)      # ranks hold 2 and 3 rows
    gathered, offset = gather_with_grad(feats)
    gathered.sum().backward()
    img = torch.eye(5)[2 * r: 2 * r + 2 + r][:, :4].clone().requires_grad_(True)
    loss = image_text_infonce(img[:2], img[:2].detach(), torch.tensor(10.0))
    loss.backward()
    gather_info = {"rows": gathered.shape[0], "offset": offset, "values": gathered[:, 0].tolist(),
                   "local_grad": feats.grad.sum().item(), "infonce": loss.item()}
    p = flat_params(acc.unwrap_model(t.model))
    (out / f"replica_{acc.process_index}.json").write_text(json.dumps(
        {"world": acc.num_processes, "step": t.step, "params": [round(x, 6) for x in p.tolist()],
         "samples": seen, "gather": gather_info}))
    # a clean teardown: leaving the gloo group to the interpreter's exit now and then aborts
    # a rank ("terminate called without an active exception") after the work is done
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
