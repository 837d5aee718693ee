"""Qwen2-VL / Qwen2.5-VL image processor for ``trust_remote_code`` loading under transformers 4.40, written for
hallupatch from transformers 4.51.3's ``Qwen2VLImageProcessor`` (the slow, numpy one) and checked against it.

Each image is resized (bicubic) to the nearest multiples of 28 whose area lies in ``[min_pixels, max_pixels]``
(``smart_resize``), rescaled to [0, 1], CLIP-normalised, repeated to the 2-frame temporal patch, and cut into
14x14 patches listed 2x2 merge window by merge window, each flattened to ``C*2*14*14`` values.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import convert_to_rgb, resize, to_channel_dimension_format
from transformers.image_utils import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling,
                                      get_image_size, infer_channel_dimension_format, make_list_of_images,
                                      to_numpy_array, valid_images)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> Tuple[int, int]:
    """The size closest to ``height x width`` with both sides multiples of ``factor`` and the area in
    ``[min_pixels, max_pixels]`` (the aspect ratio kept as well as those allow)."""
    if height < factor or width < factor:
        raise ValueError(f"height:{height} and width:{width} must be larger than factor:{factor}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        new_height = math.floor(height / beta / factor) * factor
        new_width = math.floor(width / beta / factor) * factor
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def as_video_list(videos) -> List[list]:
    """Videos as a list of frame lists: one video may be given as its frames (PIL images or 3-D arrays) or
    as one 4-D array; several as a list of those."""
    def is_frame(item) -> bool:
        return not isinstance(item, (list, tuple)) and getattr(item, "ndim", 3) == 3

    def frames(video) -> list:
        return list(video) if isinstance(video, (list, tuple)) or getattr(video, "ndim", 0) == 4 else [video]

    if getattr(videos, "ndim", 0) == 4 or (isinstance(videos, (list, tuple)) and videos and is_frame(videos[0])):
        return [frames(videos)]
    if isinstance(videos, (list, tuple)) and videos:
        return [frames(video) for video in videos]
    raise ValueError("videos must be a list of frames (PIL images or HxWxC arrays), a 4-D array, or a list of those")


class Qwen2VLImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    def __init__(self, do_resize: bool = True, size: Optional[Dict[str, int]] = None,
                 resample: PILImageResampling = PILImageResampling.BICUBIC, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 do_convert_rgb: bool = True, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        if size is not None and ("shortest_edge" not in size or "longest_edge" not in size):
            raise ValueError("size must contain 'shortest_edge' and 'longest_edge' keys.")
        # transformers 4.51 ignores a given size here (it always starts from the defaults); min_pixels and
        # max_pixels, which the hub's preprocessor_config.json carries, decide
        size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        self.min_pixels = size["shortest_edge"]
        self.max_pixels = size["longest_edge"]
        self.size = size
        self.do_resize = do_resize
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = image_mean if image_mean is not None else OPENAI_CLIP_MEAN
        self.image_std = image_std if image_std is not None else OPENAI_CLIP_STD
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.do_convert_rgb = do_convert_rgb

    def flatten_patches(self, images, size: Dict[str, int], resample, input_data_format=None):
        """One image (or the frames of one video) -> ``(patches, C*T*P*P)`` and its ``(t, h, w)`` patch grid."""
        images = make_list_of_images(images)
        if self.do_convert_rgb:
            images = [convert_to_rgb(image) for image in images]
        images = [to_numpy_array(image) for image in images]
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(images[0])
        height, width = get_image_size(images[0], channel_dim=input_data_format)
        new_height, new_width = height, width
        processed = []
        for image in images:
            if self.do_resize:
                new_height, new_width = smart_resize(height, width, factor=self.patch_size * self.merge_size,
                                                     min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
                image = resize(image, size=(new_height, new_width), resample=resample,
                               input_data_format=input_data_format)
            if self.do_rescale:
                image = self.rescale(image, scale=self.rescale_factor, input_data_format=input_data_format)
            if self.do_normalize:
                image = self.normalize(image=image, mean=self.image_mean, std=self.image_std,
                                       input_data_format=input_data_format)
            processed.append(to_channel_dimension_format(image, ChannelDimension.FIRST,
                                                         input_channel_dim=input_data_format))
        patches = np.array(processed)
        if patches.shape[0] % self.temporal_patch_size != 0:
            repeats = np.repeat(patches[-1][np.newaxis], self.temporal_patch_size - 1, axis=0)
            patches = np.concatenate([patches, repeats], axis=0)
        channels = patches.shape[1]
        grid_t = patches.shape[0] // self.temporal_patch_size
        grid_h, grid_w = new_height // self.patch_size, new_width // self.patch_size
        merge, patch = self.merge_size, self.patch_size
        patches = patches.reshape(grid_t, self.temporal_patch_size, channels, grid_h // merge, merge, patch,
                                  grid_w // merge, merge, patch)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(grid_t * grid_h * grid_w, channels * self.temporal_patch_size * patch * patch)
        return flat, (grid_t, grid_h, grid_w)

    def preprocess(self, images=None, videos=None, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                   size: Optional[Dict[str, int]] = None, resample=None, return_tensors=None,
                   input_data_format=None, **kwargs) -> BatchFeature:
        unknown = sorted(set(kwargs) - {"data_format", "do_resize", "do_rescale", "do_normalize", "do_convert_rgb"})
        if unknown:
            raise TypeError(f"Qwen2VLImageProcessor.preprocess got unexpected arguments {unknown}")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if kwargs.get(flag) is not None and kwargs[flag] != getattr(self, flag):
                raise ValueError(f"set {flag} on the image processor (image_processor.{flag} = ...), not per call")
        if size is not None:
            if "shortest_edge" not in size or "longest_edge" not in size:
                raise ValueError("size must contain 'shortest_edge' and 'longest_edge' keys.")
        else:
            size = {"shortest_edge": self.min_pixels if min_pixels is None else min_pixels,
                    "longest_edge": self.max_pixels if max_pixels is None else max_pixels}
        resample = self.resample if resample is None else resample
        data = {}
        if images is not None:
            images = make_list_of_images(images)
            if not valid_images(images):
                raise ValueError("Invalid image type. Must be of type PIL.Image.Image, numpy.ndarray or torch.Tensor.")
            pixel_values, grids = [], []
            for image in images:
                patches, grid = self.flatten_patches(image, size, resample, input_data_format)
                pixel_values.extend(patches)
                grids.append(grid)
            data.update({"pixel_values": np.array(pixel_values), "image_grid_thw": np.array(grids)})
        if videos is not None:
            pixel_values, grids = [], []
            for frames in as_video_list(videos):
                patches, grid = self.flatten_patches(frames, size, resample, input_data_format)
                pixel_values.extend(patches)
                grids.append(grid)
            data.update({"pixel_values_videos": np.array(pixel_values), "video_grid_thw": np.array(grids)})
        return BatchFeature(data=data, tensor_type=return_tensors)
