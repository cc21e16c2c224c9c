"""Students: timm backbones that state their feature levels, and heads trained on top of them."""
