"""tap_val.py RUN CONFIG MODELS SCANS OUT: teacher / student / no-KD on the same candidates of
validation scans (the evaluate phase's code path pointed at another folder)."""
import json
import sys
from pathlib import Path

from CMBDetectorLib.training.train import Run, TrainConfig


class ValRun(Run):
    scans = None

    def test_dir(self, split="test"):
        return Path(self.scans)


def main():
    run_dir, config, models, scans, out = sys.argv[1:6]
    over = json.loads(Path(config).read_text())
    cfg = TrainConfig()
    for k, v in over.items():
        setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) else v)
    run = ValRun(run_dir, cfg)
    run.scans = scans
    run.seeds["test"] = sorted(int(p.name.split("_")[0][4:]) for p in Path(scans).glob("sub-*_truth.json"))
    rep = run.evaluate_test(models, out_dir=out)
    for key in ("student", "student_nokd", "teacher"):
        bm = rep[key]["by_modality"]
        print(key, {m: round(100 * bm[m]["froc"]["cleanup"]["tpr_at_fp"]["1.0"], 1) for m in bm})


if __name__ == "__main__":
    main()
