"""Stage 2: MemBridge fusion pre-training (bridge tokens read from the memory bank; VTM + MLM + PLM) on WebVid,
with the stage-1 CLIP frozen; evaluated on MSR-VTT 1k-A retrieval with top-k re-ranking and on held-out pairs.

The published command line runs unchanged with ``light.pytorch.launch`` replaced by ``torchrun``::

    torchrun --nproc_per_node 8 main_task_fusion.py --do_train --num_thread_reader=4 \\
        --cross_config_path ./CLIP-modules --epochs=10 --batch_size=32 --n_display=50 \\
        --train_csv ${DATA_PATH}/frozen_train_labels.json --val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv \\
        --data_path ${DATA_PATH}/frozen_train_labels.json --features_path ${DATA_PATH}/MSRVTT_Videos \\
        --warmup_proportion 0.2 --output_dir ${OUTPUT_PATH} --lr 1e-5 --max_words 32 --max_frames 12 \\
        --batch_size_val 32 --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 2 --coef_lr 1e-3 \\
        --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP \\
        --init_model ${INIT_MODEL}

``--init_model`` (the stage-1 checkpoint, ours or published) gives the CLIP sizes, ``--cross_config_path`` the
fusion's. Synthetic data, tiny model: ``scripts/demo.py`` logs the exact command of every stage.
"""

from __future__ import annotations

from engine.builders import build_model, build_pretrain_set
from engine.flags import build_parser
from engine.run import Job, cli, prepare_model, run_main
from modules.membridge import Stage2Weights
from pretraining.fusion_task import FusionPretrainTask, attach_stage2_draws, held_out_metrics
from video_text_retrieval.settings import build_retrieval_evaluator


def build(args, dist) -> Job:
    """Frozen CLIP + fusion, VTM + MLM + PLM; retrieval test with re-ranking plus held-out fusion accuracies."""
    model = prepare_model(args, build_model(args, with_fusion=True), freeze=False)
    weights = Stage2Weights(args.w_vtm, args.w_mlm, args.w_plm, args.vtm_negative_scale, args.w_align, args.w_match)
    size = model.encoder.clip.config.image_resolution
    evaluate = (
        build_retrieval_evaluator(args, args.datatype, "test", size, dist, held_out_metrics) if args.val_csv else None
    )

    def train_set():
        dataset = build_pretrain_set(args, size, dist, frozen_encoder=model.encoder)
        attach_stage2_draws(dataset, args.max_words)  # per-sample draws: any number of ranks trains the same
        return dataset

    return Job(FusionPretrainTask(model, weights), train_set=train_set, test=evaluate)


def main(argv: list[str] | None = None) -> dict:
    return run_main(build_parser("fusion", description=__doc__.split("\n\n")[0]), build, argv)


if __name__ == "__main__":
    cli(main)
