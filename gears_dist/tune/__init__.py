"""gears_dist.tune"""
