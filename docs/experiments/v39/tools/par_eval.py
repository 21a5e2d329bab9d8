"""Detect both held-out splits side by side (one process per split, one thread each); the
normal `cmbdetector train --phases evaluate` afterwards skips the detected scans and scores."""
import json, sys, os
from multiprocessing import Process
from pathlib import Path
sys.path.insert(0, "CMBDetector")

def load(run_dir, config):
    from CMBDetectorLib.training.train import Run, TrainConfig
    cfg = TrainConfig()
    for k, v in json.loads(Path(config).read_text()).items():
        setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) else v)
    return Run(run_dir, cfg)

def work(run_dir, config, models, split):
    import torch
    torch.set_num_threads(1)
    load(run_dir, config).evaluate_test(models, split=split)

if __name__ == "__main__":
    run_dir, config, models = sys.argv[1:4]
    run = load(run_dir, config)
    run.build_test_scans()
    ps = [Process(target=work, args=(run_dir, config, models, sp)) for sp in run.test_splits()]
    for p in ps: p.start()
    for p in ps: p.join()
    sys.exit(max(p.exitcode for p in ps))
