"""The demo's live progress (kd_det/utils/progress.py), on log lines recorded from a demo run."""

import io

from kd_det.utils.progress import (
    Progress,
    ProgressDisplay,
    parse_progress,
    read_max_iter,
    strip_log_prefix,
)

# recorded from `make demo` (the teacher's run_demo.log)
TRAIN_LINE = (
    "[12/04 16:23:39 d2.utils.events]:  eta: 0:06:31  iter: 19  total_loss: 1.391  loss_cls: "
    "0.7341  loss_box_reg: 0.2196  loss_rpn_cls: 0.304  loss_rpn_loc: 0.01526  time: 2.9069  "
    "data_time: 0.0347  lr: 0.00095005  \n"
)
LAST_LINE = (
    "[12/04 16:30:53 d2.utils.events]:  eta: 0:00:00  iter: 199  total_loss: 1.174  loss_cls: "
    "0.5822  loss_box_reg: 0.5527  time: 2.4440  data_time: 0.0180  lr: 1e-05  \n"
)
EVAL_LINE = (
    "[12/04 16:30:53 d2.evaluation.evaluator]: Inference done 11/150. Dataloading: 0.0012 s/iter. "
    "Inference: 0.0424 s/iter. Eval: 0.0002 s/iter. Total: 0.0438 s/iter. ETA=0:00:06\n"
)
RESULT_LINE = "[12/04 16:31:00 d2.evaluation.testing]: copypaste: 7.5907,17.2479,5.0294,7.3813\n"


def test_parse_training_line():
    assert parse_progress(TRAIN_LINE, 200) == Progress("train", 20, 200, 391.0, 1.391)
    assert parse_progress(LAST_LINE, 200) == Progress("train", 200, 200, 0.0, 1.174)
    # the first print has no ETA yet; a run of more than a day; the total not known yet
    no_eta = "[12/04 16:23:39 d2.utils.events]:  iter: 19  total_loss: nan  time: 2.9\n"
    p = parse_progress(no_eta)
    assert p[:4] == ("train", 20, None, None) and p.loss != p.loss  # nan
    day = TRAIN_LINE.replace("eta: 0:06:31", "eta: 1 day, 2:00:05")
    assert parse_progress(day, 200).eta == 86400 + 7205


def test_parse_evaluation_line_and_others():
    assert parse_progress(EVAL_LINE) == Progress("eval", 11, 150, 6.0)
    assert parse_progress(RESULT_LINE) is None
    start = "[12/04 16:22:40 d2.engine.train_loop]: Starting training from iteration 0\n"
    assert parse_progress(start) is None
    # "iter: " inside another message is not progress
    assert parse_progress("[12/04 16:22:40 kd_det.x]: skipped at iter: 3 of 5\n") is None
    assert strip_log_prefix(RESULT_LINE) == "copypaste: 7.5907,17.2479,5.0294,7.3813"


def test_plain_lines_keep_the_whole_message():
    out = io.StringIO()
    display = ProgressDisplay("teacher", out, tty=False)
    display.update(parse_progress(TRAIN_LINE, 200))
    display.line(strip_log_prefix(RESULT_LINE))
    display.close()
    assert out.getvalue().splitlines() == [
        "[teacher] train  20/200   10%  eta 0:06:31  total_loss 1.391",
        "[teacher] copypaste: 7.5907,17.2479,5.0294,7.3813",
    ]


def test_bar_on_a_terminal_is_redrawn_in_place():
    out = io.StringIO()
    display = ProgressDisplay("ssim_kd", out, tty=True)
    display.update(parse_progress(TRAIN_LINE, 200))
    display.update(parse_progress(LAST_LINE, 200))
    display.line("Total training time: 0:08:05")
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n[ssim_kd] Total training time: 0:08:05\n")
    last = text.split("\r")[-1].split("\n")[0]
    assert last.startswith("[ssim_kd] train  |" + "#" * 24 + "|  200/200  100%  eta 0:00:00")


def test_evaluation_lines_are_throttled_off_a_terminal():
    out = io.StringIO()
    display = ProgressDisplay("student", out, tty=False, eval_period=3600)
    display.update(Progress("eval", 11, 150, 6.0))
    display.update(Progress("eval", 130, 150, 1.0))  # within the period: not shown
    display.update(Progress("eval", 150, 150, 0.0))  # the last one always is
    assert [ln.split("  ")[1] for ln in out.getvalue().splitlines()] == ["11/150", "150/150"]


def test_max_iter_from_the_runs_config(tmp_path):
    assert read_max_iter(str(tmp_path)) is None
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 150\n  BASE_LR: 0.01\n")
    assert read_max_iter(str(tmp_path)) == 150
