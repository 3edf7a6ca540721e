"""Demo data, models and training loops: what the CLI's main job, the examples, the tests and the
benchmarks run on (LeNets, small ResNet / VGG and the deep CIFAR-style models on Fashion-MNIST,
a CIFAR-10 folder you supply, or scikit-learn's digits).

Nothing in the pruning core depends on this package: bring your own model, ``evaluate`` and
``finetune``. It is here so ``de-plugin run`` works out of the box, and so that a newcomer finds
a complete, small, real setup to copy from:

* :mod:`de_plugin.demo.data`: IDX (MNIST-format) folders, e.g. Debian's Fashion-MNIST (``size=32``
  pads to 32x32), CIFAR-10 python batches (``load_cifar10``), and digits;
* :mod:`de_plugin.demo.models`: LeNet-300-100, LeNet-5, SmallResNet, SmallVGG, and from
  :mod:`de_plugin.demo.deep` ResNet-20/56, MobileNetV2, a small ViT (``create_model``);
* :mod:`de_plugin.demo.training`: ``train``, ``make_evaluate``, ``make_finetune``, ``dense_model``.
"""
