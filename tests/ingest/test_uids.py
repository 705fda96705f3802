import pytest

from kaapana_assets.archive.layout import archive_relpath
from kaapana_assets.dicom.uids import InvalidUID, is_valid_uid, require_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.123", "0", "1.0.3", "9" * 64])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    ["", "../../etc", "1.2/3", "1..2", ".1.2", "1.2.", "1.02", "1.2.a", "1.2 ", "9" * 65, None, 12, "1.2\x00"],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID, match="not a valid DICOM UID"):
        require_uid(uid, "StudyInstanceUID")


def test_archive_path_refuses_traversal() -> None:
    assert archive_relpath("1.2", "1.3", "1.4") == "1.2/1.3/1.4.dcm"
    with pytest.raises(InvalidUID, match="StudyInstanceUID"):
        archive_relpath("../../etc", "1.3", "1.4")
    with pytest.raises(InvalidUID, match="SOPInstanceUID"):
        archive_relpath("1.2", "1.3", "1.4/../../x")
