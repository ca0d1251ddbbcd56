"""gears_dist.distributed"""
