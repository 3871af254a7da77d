"""dicom.image_ranges: the images string of a series."""
import pytest

from dicom import image_ranges


@pytest.mark.parametrize("text, numbers", [
    ("", []), ("1", [1]), ("1-3,5", [1, 2, 3, 5]), ("8-10,1-2", [1, 2, 8, 9, 10]),
    ("3-5,4-6", [3, 4, 5, 6]), ("0", [0]),
])
def test_parse_images(text, numbers):
    assert image_ranges.parse_images(text) == numbers


@pytest.mark.parametrize("text", ["1,", "a", "1--2", "01", "1-", "-1", " 1", "1;2"])
def test_parse_images_rejects_malformed(text):
    with pytest.raises(image_ranges.ImagesStringError):
        image_ranges.parse_images(text)


@pytest.mark.parametrize("numbers, text", [
    ([], ""), ([5], "5"), ([3, 1, 2, 5], "1-3,5"), ([10, 8, 9, 1, 2, 3, 5], "1-3,5,8-10"),
    ([1, 1, 2], "1-2"),
])
def test_images_string(numbers, text):
    assert image_ranges.images_string(numbers) == text


@pytest.mark.parametrize("text, numbers, result", [
    ("1-3,5", [4], "1-5"), ("", [7], "7"), ("1-3", [3], "1-3"), ("2-3", [1, 10], "1-3,10"),
    ("5,1", [2], "1-2,5"),
])
def test_merge_images(text, numbers, result):
    assert image_ranges.merge_images(text, numbers) == result


def test_has_image():
    assert image_ranges.has_image("1-3,8", 8) and image_ranges.has_image("1-3,8", 2)
    assert not image_ranges.has_image("1-3,8", 4)
