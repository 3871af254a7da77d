"""The image server's ``metadata`` of a volume (API.md 3.19), as CIRCUS RS computes it."""
import math

MODALITIES_3D = ("CT", "MR", "PT")
ESTIMATES = ("full", "first", "center", "none")


def _js(value):
    """A float as JSON gives it in JavaScript: NaN -> null, 2.0 -> 2."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return int(value) if float(value).is_integer() else value


def metadata(volume, zs, estimate="none"):
    """The metadata of the slices ``zs`` (request order) of a ``CachedVolume``.

    Geometry, pixel format and the DICOM window come from the request's smallest image;
    mode and slice pitch from the first two images of the whole series.
    """
    primary = min(zs)
    first = volume.slice_info(primary)
    mode = "3d" if _like_3d(volume) else "2d"
    pitch = _pitch(volume) if mode == "3d" else 1
    body = {"voxelCount": [first.columns, first.rows, len(set(zs))],
            "voxelSize": [_js(first.pixel_spacing[0]), _js(first.pixel_spacing[1]), _js(pitch)]}
    window = volume.attributes(primary)["window"]
    if window is not None:
        body["dicomWindow"] = {"level": _js(window["level"]), "width": _js(window["width"])}
    body["pixelFormat"] = first.pixel_format
    if estimate != "none":
        body["estimatedWindow"] = estimated_window(volume, zs, estimate)
    body["mode"] = mode
    return body


def _looks_3d(volume, z):
    slice_ = volume.slice_info(z)
    image_type = volume.attributes(z)["imageType"] or ""
    return slice_.modality in MODALITIES_3D and slice_.pixel_format != "rgba8" \
        and not image_type.startswith("DERIVED")


def _like_3d(volume):
    if len(volume.numbers) == 1:
        return _looks_3d(volume, 0)
    return _looks_3d(volume, 0) and _looks_3d(volume, 1) and \
        volume.attributes(0)["orientation"] == volume.attributes(1)["orientation"]


def _pitch(volume):
    """|Spacing Between Slices|, else |Slice Location difference| (NaN if missing), else 1."""
    first = volume.slice_info(0)
    if first.spacing_between_slices:
        return abs(first.spacing_between_slices)
    if len(volume.numbers) > 1:
        return abs(volume.slice_info(1).slice_location - first.slice_location)
    return 1


def estimated_window(volume, zs, algorithm):
    """``{level, width}`` from the minimum and maximum of the chosen slices."""
    ordered = sorted(set(zs))
    chosen = {"full": ordered, "first": ordered[:1],
              "center": [ordered[len(ordered) // 2]]}[algorithm]
    low, high = math.inf, -math.inf
    for z in chosen:
        if volume.first.pixel_format == "rgba8":
            # CIRCUS's RGB extractor reports min 255, max 0 (its initial values)
            low, high = min(low, 255), max(high, 0)
            continue
        pixels = volume.pixels(z)
        low, high = min(low, int(pixels.min())), max(high, int(pixels.max()))
    width = math.floor(high - low + 1)
    return {"level": math.floor(low + width / 2), "width": width}
