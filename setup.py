from setuptools import find_packages, setup

setup(
    name="scalecrafter-ldm",
    version="0.1.0",
    description="Tuning-free higher-resolution image generation with pretrained latent diffusion models (ScaleCrafter and successors)",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm.app": ["static/*"]},  # the web app's page
    python_requires=">=3.9",
    install_requires=[],  # see requirements.txt (torch pins are environment-specific)
)
