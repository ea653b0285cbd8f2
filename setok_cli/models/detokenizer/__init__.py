"""The detokenizer (paper eq. 3): tokens -> image, in three parts.

    mapper.py       the Q-Former feature mapper: tokens -> the UNet's conditioning
    canvas.py       the token canvas: tokens drawn onto a grid, into the UNet's input
    detokenizer.py  the configs' presets, DetokenizerConfig and Detokenizer (the UNet,
                    the training loss, sampling, persistence)
"""
from .canvas import (CANVAS_KINDS, BilinearCanvas, LocalCanvas, MlpCanvas, SpriteCanvas, TokenCanvas,
                     canvas_mask_loss, cell_centres, fourier_2d, instance_canvas_targets, make_canvas)
from .detokenizer import (UNET_PRESETS, VAE_PRESETS, Detokenizer, DetokenizerConfig, count_parameters,
                          unet_config)
from .mapper import MAPPER_PRESETS, MapperConfig, TokenMapper, bert_to_qformer_state_dict

__all__ = ["Detokenizer", "DetokenizerConfig", "MapperConfig", "TokenMapper", "TokenCanvas", "MlpCanvas",
           "BilinearCanvas", "LocalCanvas", "SpriteCanvas", "CANVAS_KINDS", "make_canvas", "UNET_PRESETS",
           "VAE_PRESETS", "MAPPER_PRESETS", "bert_to_qformer_state_dict", "instance_canvas_targets",
           "canvas_mask_loss", "fourier_2d", "cell_centres", "unet_config", "count_parameters"]
