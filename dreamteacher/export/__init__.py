"""Exports: the backbone of a training checkpoint under the key names of the library users fine-tune
in (timm, torchvision, smp, mmseg, detectron2), and a pretrained decoder where the method has one."""
