"""benchmarks/pred_pictures.py: per-image counts from a prediction file, as `setok eval generate` scores it."""
import json

import numpy as np
from PIL import Image


def test_per_image_counts_and_picture(world, tmp_path, benchmark_script, capsys):
    mod = benchmark_script("pred_pictures")
    data = world / "pairs.json"
    entries = json.loads(data.read_text())
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "blank.png")
    # the true image for even entries, a blank one for odd entries (given out of order, matched by caption)
    preds = [{"caption": e["caption"], "image": str(world / e["image"]) if i % 2 == 0 else "blank.png"}
             for i, e in enumerate(entries)][::-1]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    aligned, recall, precision = mod.per_image(str(data), str(tmp_path / "p.json"))
    true = np.array([len(e["phrases"]) for e in entries])
    even = np.arange(len(entries)) % 2 == 0
    assert [a["caption"] for a in aligned] == [e["caption"] for e in entries]
    assert (recall[:, 1] == true).all()
    assert (recall[even, 0] == true[even]).all() and (recall[~even, 0] == 0).all()
    assert (precision[~even, 1] == 0).all() and (precision[even, 0] == precision[even, 1]).all()
    out = tmp_path / "pic.png"
    mod.main(["--data", str(data), "--row", f"half right={tmp_path / 'p.json'}", "--out", str(out), "--n", "4"])
    totals = json.loads(capsys.readouterr().out)["all images"]["half right"]
    assert totals["object_recall"] == true[even].sum() / true.sum()
    assert totals["object_precision"] == 1.0
    assert Image.open(out).size[0] > 4 * 64
