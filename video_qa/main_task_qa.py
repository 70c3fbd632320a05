"""Video question answering (MSRVTT-QA, MSVD-QA) through the MemBridge bridge fusion (DESIGN §2.7).

The published command line runs with ``light.pytorch.launch main_task_qa_msrvtt.py`` replaced by
``torchrun -m video_qa.main_task_qa`` (``start_qa_msrvtt.sh`` / ``start_qa_msvd.sh`` hold the recipe)::

    torchrun --nproc_per_node 8 -m video_qa.main_task_qa --do_train --num_thread_reader=4 --epochs=5 \\
        --batch_size=32 --n_display=50 --cross_config_path ./CLIP-modules \\
        --msrvtt_qa_train_json ${DATA_PATH}/train.jsonl --msrvtt_qa_val_json ${DATA_PATH}/val.jsonl \\
        --msrvtt_qa_test_json ${DATA_PATH}/test.jsonl --msrvtt_qa_anslabel_json ${DATA_PATH}/train_ans2label.json \\
        --msrvtt_features_path ${DATA_PATH}/MSRVTT_Videos --warmup_proportion 0.1 --output_dir ${OUTPUT_PATH} \\
        --lr 2e-4 --max_words 32 --max_frames 12 --batch_size_val 32 --feature_framerate 1 --coef_lr 1e-3 \\
        --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP \\
        --init_model ${INIT_MODEL}

``--datatype msvd_qa`` reads MSVD-QA from the same flags. With a val set every epoch is validated and the best
accuracy's weights answer the test set (``predictions_test.jsonl``, ``eval_results.json``).
"""

from __future__ import annotations

from pathlib import Path

from dataloaders.tokenizer import ClipTokenizer
from engine.builders import clip_image_size
from engine.data import EvalSettings
from engine.run import Job, cli, prepare_model, run_main
from video_qa import task as qa


def build(args, dist) -> Job:
    """QA model (classifier or first-token head) on the fusion; val-selected weights answer the test questions."""
    tokenizer, settings = ClipTokenizer(), EvalSettings.from_flags(args)
    splits = qa.build_qa_splits(args, clip_image_size(args), tokenizer)
    model = prepare_model(args, qa.build_qa_model(args, qa.num_answer_classes(splits.ans2label)))
    val = qa.QAEvaluator(splits.val, dist, settings, tokenizer) if splits.val and args.do_train else None
    predictions = Path(args.output_dir) / qa.PREDICTIONS_FILE
    test = qa.QAEvaluator(splits.test, dist, settings, tokenizer, predictions) if splits.test else None
    task = qa.QATask(model, args.qa_contrastive_weight)
    return Job(task, lambda: splits.train, test, val, "accuracy" if val else None)


def main(argv: list[str] | None = None) -> dict:
    return run_main(qa.build_qa_parser(__doc__.split("\n\n")[0]), build, argv, check=qa.validate_qa_flags)


if __name__ == "__main__":
    cli(main)
