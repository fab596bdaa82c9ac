"""Small-image backbones registered in timm's own model registry, one family per file.

Importing this package makes ``timm.create_model`` know ``resnet18_cifar``
(:mod:`.resnet`), ``vgg11_cifar`` (:mod:`.vgg`), ``ff_mlp`` (:mod:`.mlp`),
``resnet32_cifar`` / ``resnet110_cifar`` (:mod:`.cifar_resnets`) and ``softhebb_cnn``
(:mod:`.softhebb`); what they
share (CIFAR-10 statistics, timm's pretrained-cfg) is in :mod:`.cifar`.
"""

from .cifar import CIFAR10_MEAN, CIFAR10_STD
from .cifar_resnets import CifarResNet, resnet32_cifar, resnet110_cifar
from .mlp import FFLayer, FFMlp, ff_mlp, rms_normalize
from .resnet import resnet18_cifar
from .softhebb import SoftHebbCNN, softhebb_cnn
from .vgg import CifarVGG, vgg11_cifar

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CifarResNet", "CifarVGG", "FFLayer", "FFMlp",
           "SoftHebbCNN", "ff_mlp", "resnet110_cifar", "resnet18_cifar", "resnet32_cifar",
           "rms_normalize", "softhebb_cnn", "vgg11_cifar"]
