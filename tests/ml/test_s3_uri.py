import pytest

from ml.contract.container import split_s3_uri


@pytest.mark.parametrize("uri, parts", [("s3://bucket/a/b.json", ("bucket", "a/b.json")), ("s3://bucket/", ("bucket", "")),
                                        ("s3://bucket", ("bucket", "")), ("s3://b/prefix/", ("b", "prefix/"))])
def test_an_s3_uri_splits_into_bucket_and_key(uri, parts):
    assert split_s3_uri(uri) == parts


@pytest.mark.parametrize("uri", ["bucket/key", "s3:/bucket/key", "s3:///key", "", "https://bucket.s3.amazonaws.com/k"])
def test_anything_else_is_refused_with_the_form_to_use(uri):
    with pytest.raises(ValueError, match="is not an s3:// URI: write it as s3://bucket/key"):
        split_s3_uri(uri)
