"""adalora"""
