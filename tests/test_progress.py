"""Progress without a terminal: the bar turns itself off, a line is logged at a fixed interval instead."""
import logging

from de_plugin.progress import progress_bar


def test_progress_is_logged_when_no_terminal_shows_a_bar(caplog):
    with caplog.at_level(logging.INFO, logger="de_plugin"):
        with progress_bar(total=4, desc="DE", log_every=0.0) as bar:  # pytest's capture is no terminal
            for _ in range(4):
                bar.update(1)
                bar.set_postfix(best="0.5000")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DE: ")]
    assert lines[:2] == ["DE: 1/4 (0 s)", "DE: 2/4 (0 s), best=0.5000"] and "DE: 4/4" in lines[-1]


def test_no_progress_lines_when_progress_is_off(caplog):
    with caplog.at_level(logging.INFO, logger="de_plugin"):
        for _ in progress_bar(range(3), desc="quiet", enabled=False, log_every=0.0):
            pass
    assert not [r for r in caplog.records if r.getMessage().startswith("quiet")]


def test_an_iterated_bar_logs_too(caplog):
    with caplog.at_level(logging.INFO, logger="de_plugin"):
        assert list(progress_bar(range(3), desc="fine-tune", log_every=0.0)) == [0, 1, 2]
    assert "fine-tune: 3/3 (0 s)" in [r.getMessage() for r in caplog.records]
