"""Operating a farm: what installs, deploys and packages polyarch (wheelhouses, images)."""
