"""Video captioning on MSR-VTT / MSVD through the MemBridge fusion: fine-tune the prefix LM, decode, score.

The published command line runs with only the launcher and the script name changed (``--expand_msrvtt_sentences``
is accepted; captioning always trains on every reference)::

    torchrun --nproc_per_node 8 video_captioning/main_task_caption.py --do_train --num_thread_reader=4 \\
        --cross_config_path ./CLIP-modules --epochs=10 --batch_size=32 --n_display=50 \\
        --data_path ${DATA_PATH} --features_path ${DATA_PATH}/MSVD_Videos --warmup_proportion 0.2 \\
        --output_dir ${OUTPUT_PATH} --lr 5e-5 --max_words 32 --max_frames 12 --batch_size_val 32 \\
        --datatype msvd --expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 \\
        --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP --init_model ${Pretrained_Model}

MSR-VTT: ``--datatype msrvtt --data_path ${DATA_PATH}/MSRVTT_data.json --features_path ${DATA_PATH}/videos`` (train,
validate and test = video7010..video9999 with all 20 references, from the json's split field). ``--beam_size N``
(default 1 = greedy, the family default) and ``--length_penalty`` set the decoding. Every epoch is evaluated on the
validation split and the best CIDEr's weights decode the test set (``captions_test.json``, ``eval_results.json``,
``best_model.safetensors``). Evaluate a model only: ``--do_eval --init_model best_model.safetensors``.
On the embedded synthetic data with the tiny model (``python -m dataloaders.synthetic --output_dir data/synth``)::

    python video_captioning/main_task_caption.py --do_train --datatype msvd --data_path data/synth/msvd \\
        --features_path data/synth/videos --clip_config CLIP-modules/tiny.json \\
        --cross_config_path CLIP-modules/fusion-tiny.json --max_frames 4 --max_words 16 --batch_size 32 \\
        --epochs 10 --lr 1e-3 --coef_lr 1 --output_dir runs/caption_msvd
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python video_captioning/main_task_caption.py): find the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.errors import ConfigError, DataError  # noqa: E402
from dataloaders.tokenizer import ClipTokenizer  # noqa: E402
from engine.builders import build_dataset, convert_weights_fp16, start_run  # noqa: E402
from engine.distributed import cleanup, init_distributed  # noqa: E402
from engine.flags import build_parser, validate  # noqa: E402
from engine.trainer import fit, run_evaluation  # noqa: E402
from video_captioning.decoding import DEFAULT_LENGTH_PENALTY  # noqa: E402
from video_captioning.metrics import CaptionScorer  # noqa: E402
from video_captioning.task import (  # noqa: E402
    BEST_MODEL_FILE,
    CAPTION_TARGETS,
    DEFAULT_CAPTION_TARGETS,
    BestWeights,
    CaptionEvaluator,
    CaptionTask,
    DecodeSettings,
    build_caption_model,
    caption_dataset_key,
    max_caption_tokens,
)

logger = logging.getLogger(__name__)


def build_caption_parser():
    """The shared flags plus the decoding flags of captioning."""
    parser = build_parser("caption", description=__doc__.split("\n\n")[0])
    g = parser.add_argument_group("caption decoding")
    g.add_argument("--beam_size", type=int, default=1, help="beam width; 1 = greedy search (the family default)")
    g.add_argument(
        "--length_penalty",
        type=float,
        default=DEFAULT_LENGTH_PENALTY,
        help="beam search ranks finished captions by sum(logprob) / length**length_penalty",
    )
    g.add_argument(
        "--caption_targets",
        choices=CAPTION_TARGETS,
        default=DEFAULT_CAPTION_TARGETS,
        help="training scores every reference token (all) or a random suffix per reference as in stage-2 PLM",
    )
    # Downstream fine-tuning trains the fusion at --lr (the published rule) unless --fusion_lr is given, and model
    # selection needs a validation run after every epoch.
    parser.set_defaults(fusion_lr=None, eval_every_epoch=True)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_caption_parser().parse_args(argv)
    dist = init_distributed()
    try:
        validate(args, dist.world_size)
        if args.beam_size < 1:
            raise ConfigError(f"--beam_size must be >= 1 (got {args.beam_size})")
        dataset_key = caption_dataset_key(args.datatype)
        start_run(args, dist.rank, dist.world_size)
        model = build_caption_model(args)
        if args.precision == "fp16":
            convert_weights_fp16(model)
        task = CaptionTask(model, args.caption_targets)
        image_size = model.encoder.clip.config.image_resolution
        tokenizer = ClipTokenizer()
        settings = DecodeSettings(
            max_len=max_caption_tokens(args.max_words),
            beam_size=args.beam_size,
            length_penalty=args.length_penalty,
            bos=tokenizer.sot_id,
        )

        with CaptionScorer() as scorer:

            def evaluator(split: str, selection: BestWeights | None = None) -> CaptionEvaluator:
                dataset = build_dataset(args, dataset_key, split, image_size, tokenizer=tokenizer)
                return CaptionEvaluator(
                    dataset,
                    split,
                    dist,
                    args.batch_size_val,
                    settings,
                    scorer,
                    args.output_dir,
                    tokenizer,
                    args.num_thread_reader,
                    selection,
                )

            test_eval = evaluator("test")
            if args.do_train:
                train_set = build_dataset(args, dataset_key, "train", image_size, tokenizer=tokenizer)
                selection = BestWeights()
                try:
                    val_eval = evaluator("val", selection)
                except DataError as exc:
                    logger.warning("no validation split (%s): the last weights decode the test set", exc)
                    val_eval = None
                fit(args, task, train_set, dist, val_eval)
                selection.restore(model)
                if dist.rank == 0:
                    selection.save(Path(args.output_dir) / BEST_MODEL_FILE)
                test_eval.extra = selection.summary()
            task.to(dist.device)
            return run_evaluation(args, task, test_eval, dist, tag="test")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
