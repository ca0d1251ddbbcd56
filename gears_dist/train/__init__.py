"""gears_dist.train"""
