import json
import re

import pytest

from inference_service.errors import InvalidTaskError, NotJsonError
from inference_service.settings import load_settings
from inference_service.tasks import TaskRules, decode_record, parse_task, partial_identity

ANY = TaskRules.of("frames", None)
"""Rules that allow any bucket (INFERENCE_S3_ALLOWED_BUCKETS=*): for the rules of the fields."""
OWN = TaskRules.of("frames")
"""The default rules: the default bucket alone."""


def task(**fields):
    base = {"video_id": "v1", "frame_id": 3, "s3_key": "v1/3.jpg"}
    base.update(fields)
    return base


def test_minimal_task_gets_defaults():
    t = parse_task(task(), OWN)
    assert (t.video_id, t.frame_id, t.bucket, t.s3_key, t.task_id, t.meta) == (
        "v1", 3, "frames", "v1/3.jpg", "v1:3", None,
    )  # fmt: skip


@pytest.mark.parametrize("alias", ["frame_path", "s3_path", "path"])
def test_key_aliases(alias):
    obj = {"video_id": "v", "frame_id": 0, alias: "a/b.jpg"}
    assert parse_task(obj, OWN).s3_key == "a/b.jpg"


def test_uri_sets_bucket_and_key():
    t = parse_task(task(s3_key="s3://other-bucket/x/y.jpg"), ANY)
    assert (t.bucket, t.s3_key) == ("other-bucket", "x/y.jpg")


def test_bucket_override_meta_and_task_id_copied():
    t = parse_task(task(bucket="b2-frames", task_id="t-9", meta={"cam": 2}, extra=1), ANY)
    assert (t.bucket, t.task_id, t.meta) == ("b2-frames", "t-9", {"cam": 2})


KEY_RULE = "s3_key (or frame_path, s3_path, path) must be a non-empty string"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"video_id": ""}, "video_id must be a non-empty string"),
        ({"video_id": 5}, "video_id must be a non-empty string"),
        ({"frame_id": -1}, "frame_id must be >= 0 (got -1)"),
        ({"frame_id": "3"}, "frame_id must be an integer >= 0"),
        ({"frame_id": True}, "frame_id must be an integer >= 0"),
        ({"frame_id": 1.5}, "frame_id must be an integer >= 0"),
        ({"s3_key": ""}, KEY_RULE),
        ({"s3_key": 7}, KEY_RULE),
        ({"s3_key": "../etc/passwd"}, "s3 key '../etc/passwd' has an empty, '.' or '..' segment"),
        ({"s3_key": "a//b.jpg"}, "s3 key 'a//b.jpg' has an empty, '.' or '..' segment"),
        ({"s3_key": "/abs.jpg"}, "s3 key '/abs.jpg' must not start or end with '/'"),
        ({"s3_key": "a\x00b"}, "s3 key contains control characters"),
        ({"s3_key": "s3://"}, "s3 URI 's3://' must look like s3://bucket/key"),
        (
            {"s3_key": "s3://bucket-only"},
            "s3 URI 's3://bucket-only' must look like s3://bucket/key",
        ),
        ({"bucket": "Bad_Bucket"}, "bucket 'Bad_Bucket' is not a valid S3 bucket name"),
        ({"bucket": ""}, "bucket must be a non-empty string when given"),
        ({"meta": [1]}, "meta must be an object when given"),
        ({"task_id": 12}, "task_id must be a non-empty string"),
    ],
)
def test_invalid_tasks_name_the_problem(fields, needle):
    # The needle is matched literally: the rule broken and the offending value, quoted.
    with pytest.raises(InvalidTaskError, match=re.escape(needle)):
        parse_task(task(**fields), ANY)


def test_missing_key_field():
    with pytest.raises(InvalidTaskError, match="s3_key"):
        parse_task({"video_id": "v", "frame_id": 1}, OWN)


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[1,2]", b"\xff\xfe", b'"str"'])
def test_not_json_records(raw):
    with pytest.raises(NotJsonError):
        decode_record(raw)


def test_decode_record_object():
    assert decode_record(json.dumps(task()).encode()) == task()


def test_partial_identity_keeps_what_is_usable():
    ident = partial_identity({"frame_id": "x", "s3_key": "k.jpg"}, b"vid-7", "frames")
    assert ident.video_id == "vid-7"
    assert ident.frame_id is None
    assert ident.task_id is None
    assert ident.s3_key == "k.jpg"
    ident = partial_identity({"video_id": "v", "frame_id": 2}, None, "frames")
    assert ident.task_id == "v:2"
    assert partial_identity({"video_id": "v", "frame_id": -2}, None, "frames").frame_id is None


# --- the bucket allowlist (INFERENCE_S3_ALLOWED_BUCKETS) -----------------------------------------

ALLOWLIST = "is not one this service reads: add it to INFERENCE_S3_ALLOWED_BUCKETS"


@pytest.mark.parametrize(
    ("setting", "fields", "bucket"),
    [
        (None, {}, "frames"),  # unset: the default bucket alone
        (None, {"bucket": "frames"}, "frames"),
        (None, {"s3_key": "s3://frames/v1/3.jpg"}, "frames"),
        ("cams-a,cams-b", {"bucket": "cams-b"}, "cams-b"),
        ("cams-a,cams-b", {"s3_key": "s3://cams-a/v1/3.jpg"}, "cams-a"),
        ("cams-a,cams-b", {}, "frames"),  # the default bucket stays allowed
        ("*", {"bucket": "anything-goes"}, "anything-goes"),
        ("*", {"s3_key": "s3://elsewhere/v1/3.jpg"}, "elsewhere"),
    ],
)
def test_allowed_buckets_are_read(setting, fields, bucket):
    settings = load_settings({"s3_allowed_buckets": setting, "s3_bucket": "frames"})
    rules = TaskRules.of(settings.s3_bucket, settings.allowed_buckets())
    assert parse_task(task(**fields), rules).bucket == bucket


@pytest.mark.parametrize(
    ("setting", "fields", "bucket"),
    [
        (None, {"bucket": "other-bucket"}, "other-bucket"),
        (None, {"s3_key": "s3://other-bucket/x.jpg"}, "other-bucket"),
        ("cams-a,cams-b", {"bucket": "cams-c"}, "cams-c"),
        ("cams-a,cams-b", {"s3_key": "s3://cams/x.jpg"}, "cams"),  # names, not prefixes
        # The URI's bucket wins over the field's: that is the one checked.
        ("cams-a", {"bucket": "cams-a", "s3_key": "s3://private/x.jpg"}, "private"),
    ],
)
def test_other_buckets_are_invalid_tasks_naming_bucket_and_setting(setting, fields, bucket):
    settings = load_settings({"s3_allowed_buckets": setting, "s3_bucket": "frames"})
    rules = TaskRules.of(settings.s3_bucket, settings.allowed_buckets())
    with pytest.raises(InvalidTaskError, match=re.escape(f"bucket {bucket!r} {ALLOWLIST}")):
        parse_task(task(**fields), rules)


def test_refused_bucket_keeps_the_partial_identity():
    """The error result of a refused bucket still names the task's video, frame and task id."""
    obj = task(s3_key="s3://private/x.jpg", task_id="t-1")
    with pytest.raises(InvalidTaskError):
        parse_task(obj, OWN)
    ident = partial_identity(obj, b"v1", "frames")
    assert (ident.video_id, ident.frame_id, ident.task_id) == ("v1", 3, "t-1")
