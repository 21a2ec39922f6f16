#!/usr/bin/env python
"""
Export a distilled student for release: a student-only Detectron2 checkpoint and
its own config, loadable by vanilla Detectron2 (``get_cfg().merge_from_file`` +
``build_model`` + ``DetectionCheckpointer``) with no kd_det import.

    tools/export_student.py --config-file configs/synthetic/distill/ssim_retinanet_R50_to_R18.yaml \\
        --weights output/synthetic/ssim_retinanet_R50_to_R18/model_final.pth --output-dir release/ssim_r18
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the training config")
    parser.add_argument("--weights", required=True, help="the training checkpoint (model_final.pth)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides used in training (KEY VALUE ...)")
    args = parser.parse_args(argv)

    from kd_det import get_kd_cfg
    from kd_det.export import export_student

    cfg = get_kd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    out = export_student(cfg, args.weights, args.output_dir)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
