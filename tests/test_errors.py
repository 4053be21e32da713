"""The one error policy (studio/errors.py): what a person is shown, what the log gets, what the CLI exits with."""
from __future__ import annotations

import argparse
import logging

import pytest

from studio.errors import GENERIC_MESSAGE, OUT_OF_MEMORY_MESSAGE, StudioError, user_message


def _user_error_classes():
    from studio.backbone import BackboneUnavailable
    from studio.cli import CliError
    from studio.concept_file import ConceptFileError
    from studio.conditioning import PromptError
    from studio.config import ConfigError
    from studio.engine import CannotContinue, EngineClosed, NoConceptYet
    from studio.faces import PhotoError
    from studio.metrics import ClipUnavailable
    from studio.sampler import SamplerInputError
    from studio.toy.instruments import ToyModelMissing
    from studio.toy.world import ToyPromptError
    from studio.trainer import StateMismatch, TrainingInputError
    from studio.ui.sessions import StudioFull

    return [
        BackboneUnavailable, CliError, ConceptFileError, PromptError, ConfigError, CannotContinue, EngineClosed,
        NoConceptYet, PhotoError, ClipUnavailable, SamplerInputError, ToyModelMissing, ToyPromptError,
        StateMismatch, TrainingInputError, StudioFull,
    ]


@pytest.mark.parametrize("error_class", _user_error_classes(), ids=lambda c: c.__name__)
def test_every_error_meant_for_a_person_is_a_studio_error(error_class):
    assert issubclass(error_class, StudioError)


def test_a_studio_error_is_shown_as_its_own_sentence_on_one_line_and_not_logged(caplog):
    from studio.faces import PhotoError

    with caplog.at_level(logging.DEBUG):
        text = user_message(PhotoError("No face was found\n  in selfie.jpg."))
    assert text == "No face was found in selfie.jpg."
    assert caplog.records == []


def test_an_unexpected_error_is_one_generic_sentence_and_one_log_record_with_its_traceback(caplog):
    try:
        {}["missing"]
    except KeyError as exc:
        with caplog.at_level(logging.DEBUG):
            text = user_message(exc, context="previewing in session abc")
    assert text == GENERIC_MESSAGE and "missing" not in text
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.ERROR and "previewing in session abc" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_a_plain_value_error_is_no_longer_shown_to_the_person(caplog):
    with caplog.at_level(logging.ERROR):
        assert user_message(ValueError("shapes (2, 3) and (4,) not aligned")) == GENERIC_MESSAGE


def test_out_of_memory_says_what_to_try_and_logs_one_line_without_a_traceback(caplog):
    with caplog.at_level(logging.DEBUG):
        text = user_message(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert text == OUT_OF_MEMORY_MESSAGE
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is None


def _command(exc: BaseException):
    def run(args: argparse.Namespace) -> int:
        raise exc

    return run


def test_the_cli_prints_a_studio_error_as_one_line_with_status_2(capsys):
    from studio.cli import EXIT_USER_ERROR, run_command
    from studio.config import ConfigError

    code = run_command(_command(ConfigError("train.lr must be\n above 0")), argparse.Namespace(command="train"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and err == ["error: train.lr must be above 0"]


def test_the_cli_logs_an_unexpected_error_with_its_traceback_and_exits_1(capsys, caplog):
    from studio.cli import EXIT_FAILED, run_command

    with caplog.at_level(logging.ERROR):
        code = run_command(_command(ZeroDivisionError("division by zero")), argparse.Namespace(command="eval"))
    assert code == EXIT_FAILED
    assert "error:" not in capsys.readouterr().err  # not dressed up as a user error
    [record] = [r for r in caplog.records if r.name == "studio.cli"]
    assert "eval" in record.getMessage() and record.exc_info[0] is ZeroDivisionError


def test_every_delegated_sub_command_goes_through_the_one_dispatcher(tmp_path, capsys):
    """The stand-alone entry points of prepare and eval answer a bad preset the same way as ``python -m studio``."""
    from studio.cli import EXIT_USER_ERROR
    from studio.cli_prepare import main_prepare

    photo = tmp_path / "a.png"
    photo.write_bytes(b"not a photo")
    code = main_prepare(["--preset", "no-such-preset", "--out", str(tmp_path / "out"), str(photo)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and err[0].startswith("error: ")
