"""Video question answering (MSRVTT-QA, MSVD-QA) through the MemBridge bridge fusion (DESIGN §2.7).

The published command line runs unchanged with ``light.pytorch.launch main_task_qa_msrvtt.py`` replaced by
``torchrun video_qa/main_task_qa.py`` (``start_qa_msrvtt.sh`` / ``start_qa_msvd.sh`` hold the recipe)::

    torchrun --nproc_per_node 8 video_qa/main_task_qa.py --do_train --num_thread_reader=4 --epochs=5 \\
        --batch_size=32 --n_display=50 --cross_config_path ./CLIP-modules \\
        --msrvtt_qa_train_json ${DATA_PATH}/train.jsonl --msrvtt_qa_val_json ${DATA_PATH}/val.jsonl \\
        --msrvtt_qa_test_json ${DATA_PATH}/test.jsonl --msrvtt_qa_anslabel_json ${DATA_PATH}/train_ans2label.json \\
        --msrvtt_features_path ${DATA_PATH}/MSRVTT_Videos --warmup_proportion 0.1 --output_dir ${OUTPUT_PATH} \\
        --lr 2e-4 --max_words 32 --max_frames 12 --batch_size_val 32 --feature_framerate 1 --coef_lr 1e-3 \\
        --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP \\
        --init_model ${INIT_MODEL}

(the published ``--msrvtt_train_csv --msrvtt_val_csv --msrvtt_train_json --webvid_train_json --webvid_tfrecord
--expand_msrvtt_sentences`` are accepted and unused by QA). ``--datatype msvd_qa`` reads MSVD-QA from the same
flags. Also runnable as ``python -m video_qa.main_task_qa``. On the embedded synthetic data with the tiny model
(``python -m dataloaders.synthetic --output_dir data/synth``)::

    python video_qa/main_task_qa.py --do_train --clip_config CLIP-modules/tiny.json \\
        --cross_config_path CLIP-modules/fusion-tiny.json --output_dir runs/qa \\
        --msrvtt_qa_train_json data/synth/msrvtt_qa/train.jsonl --msrvtt_qa_val_json data/synth/msrvtt_qa/val.jsonl \\
        --msrvtt_qa_test_json data/synth/msrvtt_qa/test.jsonl \\
        --msrvtt_qa_anslabel_json data/synth/msrvtt_qa/train_ans2label.json --msrvtt_features_path data/synth/videos \\
        --max_frames 4 --max_words 12 --batch_size 32 --epochs 10 --lr 1e-3 --coef_lr 1 --fusion_lr 1e-3 --loose_type
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.tokenizer import ClipTokenizer  # noqa: E402
from engine.builders import build_video_clip, convert_weights_fp16, start_run  # noqa: E402
from engine.distributed import cleanup, init_distributed  # noqa: E402
from engine.flags import build_parser, validate  # noqa: E402
from engine.trainer import fit, run_evaluation  # noqa: E402
from video_qa.model import QA_HEADS  # noqa: E402
from video_qa.task import (  # noqa: E402
    QA_DATATYPES,
    QAEvaluation,
    QATask,
    build_qa_dataset,
    build_qa_model,
    init_qa_weights,
    num_answer_classes,
    qa_data_paths,
    validate_qa_flags,
)

logger = logging.getLogger(__name__)


def build_qa_parser() -> argparse.ArgumentParser:
    """The shared ``qa`` flags plus the QA-only ones; ``--datatype`` defaults to ``msrvtt_qa``."""
    parser = build_parser("qa", description=__doc__.split("\n\n")[0])
    parser.set_defaults(datatype=QA_DATATYPES[0])
    g = parser.add_argument_group("video QA task")
    g.add_argument(
        "--qa_head",
        choices=QA_HEADS,
        default=QA_HEADS[0],
        help="classifier: MLP over the answer vocabulary; first_token: first BPE token through the vocabulary head",
    )
    g.add_argument(
        "--num_answers",
        type=int,
        default=None,
        help="answer vocabulary = the N most frequent training answers (instead of --msrvtt_qa_anslabel_json)",
    )
    g.add_argument(
        "--qa_contrastive_weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary question-video InfoNCE on the dual-encoder embeddings (0: off)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_qa_parser()
    args = parser.parse_args(argv)
    dist = init_distributed()
    try:
        validate(args, dist.world_size)
        validate_qa_flags(args)
        start_run(args, dist.rank, dist.world_size)
        encoder = build_video_clip(args)
        image_size = encoder.clip.config.image_resolution
        paths, tokenizer = qa_data_paths(args), ClipTokenizer()
        train_set = build_qa_dataset(args, "train", image_size, paths, tokenizer) if args.do_train else None
        val_set = build_qa_dataset(args, "val", image_size, paths, tokenizer) if args.msrvtt_qa_val_json else None
        test_set = build_qa_dataset(args, "test", image_size, paths, tokenizer) if args.msrvtt_qa_test_json else None
        vocab = next(d for d in (train_set, test_set, val_set) if d is not None).ans2label
        model = build_qa_model(args, encoder, num_answer_classes(vocab))
        init_qa_weights(model, args.init_model)
        frozen = encoder.freeze_layers(args.freeze_layer_num)
        logger.info("--freeze_layer_num %d: %d CLIP tensors frozen", args.freeze_layer_num, len(frozen))
        if args.precision == "fp16":
            convert_weights_fp16(model)
        task = QATask(model, args.qa_contrastive_weight)

        evaluate = None
        if test_set is not None:
            evaluate = QAEvaluation(
                test_set, val_set, dist, args.batch_size_val, args.num_thread_reader, args.output_dir, tokenizer
            )
        if args.do_train:
            return fit(args, task, train_set, dist, evaluate)
        task.to(dist.device)
        return run_evaluation(args, task, evaluate, dist)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
