"""Small reference models used by the examples, tests and benchmarks."""
from __future__ import annotations

from torch import nn

from .deep import BasicBlock, MobileNetV2, ResNetCifar, TinyViT, resnet20, resnet56


class LeNet300100(nn.Module):
    """LeNet-300-100: 784-300-100-10 fully connected (Han et al. 2015)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant: conv 20 (5x5) - pool - conv 50 (5x5) - pool - fc 500 - fc 10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


class SmallResNet(nn.Module):
    """A ResNet-style CNN for 28x28 inputs: stem, three stages of basic blocks, global pooling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class SmallVGG(nn.Module):
    """A VGG-style CNN for 28x28 inputs: 3x3 conv + BatchNorm + ReLU stacks, max pooling, one
    classifier layer over the flattened last feature maps."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, cfg=(16, 16, "M", 32, 32, "M", 64, "M")):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * 3 * 3, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))



MODELS = {"lenet300": LeNet300100, "lenet5": LeNet5, "resnet": SmallResNet, "vgg": SmallVGG,
          "resnet20": resnet20, "resnet56": resnet56, "mobilenetv2": MobileNetV2, "vit": TinyViT}

#: the CIFAR-style models: 32x32 inputs (MNIST-format data is padded for them), ``in_channels`` given
DEEP_MODELS = ("resnet20", "resnet56", "mobilenetv2", "vit")


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["LeNet300100", "LeNet5", "SmallResNet", "SmallVGG", "ResNetCifar", "MobileNetV2", "TinyViT",
           "MODELS", "DEEP_MODELS", "create_model"]
