"""The synthetic shop's catalogue: a title for each item of ``synthetic_interactions``.

Each of the shop's categories is a kind of product, and each item a product of its category's
kind, titled in English or in Chinese (every third item), so that a search in one language
finds items titled in the other. The item ids and categories are those
:func:`online_models.datasets.synthetic_interactions` draws with the same seed, so the demo's
shoppers browse, and search, the same catalogue.

>>> items = list(synthetic_catalogue(n_items=4, n_categories=3, seed=42))
>>> [(i.item_id, i.category_path) for i in items]
[('i0', ('c2',)), ('i1', ('c0',)), ('i2', ('c0',)), ('i3', ('c2',))]
>>> items[0].title, items[2].title
('Classic smart TV, red', '蓝色轻便跑步鞋')
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from online_models.search.catalogue import CatalogueItem

#: one kind of product per category (English, Chinese), in the order categories are numbered
PRODUCTS = [
    ("running shoes", "跑步鞋"), ("down jacket", "羽绒服"), ("smart TV", "智能电视"), ("coffee maker", "咖啡机"),
    ("wireless earbuds", "无线耳机"), ("yoga mat", "瑜伽垫"), ("backpack", "双肩包"), ("desk lamp", "台灯"),
    ("phone case", "手机壳"), ("electric kettle", "电热水壶"), ("wool sweater", "羊毛衫"), ("jeans", "牛仔裤"),
    ("sunglasses", "太阳镜"), ("wrist watch", "手表"), ("board game", "桌游"), ("water bottle", "水杯"),
    ("face cream", "面霜"), ("shampoo", "洗发水"), ("rice cooker", "电饭煲"), ("frying pan", "平底锅"),
    ("bed sheets", "床单"), ("pillow", "枕头"), ("office chair", "办公椅"), ("bookshelf", "书架"),
    ("mechanical keyboard", "机械键盘"), ("computer mouse", "鼠标"), ("laptop stand", "笔记本支架"),
    ("power bank", "充电宝"), ("dog food", "狗粮"), ("cat litter", "猫砂"), ("tennis racket", "网球拍"),
    ("bicycle helmet", "自行车头盔"), ("tent", "帐篷"), ("hiking boots", "登山靴"), ("umbrella", "雨伞"),
    ("perfume", "香水"), ("lipstick", "口红"), ("toy car", "玩具车"), ("jigsaw puzzle", "拼图"), ("green tea", "绿茶"),
]
ADJECTIVES = [("Classic", "经典"), ("Lightweight", "轻便"), ("Premium", "高端"), ("Compact", "小巧"),
              ("Everyday", "日常"), ("Professional", "专业"), ("Kids'", "儿童"), ("Eco-friendly", "环保")]
COLOURS = [("black", "黑色"), ("white", "白色"), ("red", "红色"), ("blue", "蓝色"), ("grey", "灰色"), ("green", "绿色")]


def synthetic_catalogue(n_items: int = 2_000, n_categories: int = 40, seed: int = 42) -> Iterator[CatalogueItem]:
    """A :class:`CatalogueItem` for every item of the synthetic shop with these parameters."""
    rng = random.Random(seed)
    item_category = [rng.randrange(n_categories) for _ in range(n_items)]  # as synthetic_interactions draws them
    names = random.Random(seed + 1)
    for item, category in enumerate(item_category):
        english, chinese = PRODUCTS[category % len(PRODUCTS)]
        adjective = names.choice(ADJECTIVES)
        colour = names.choice(COLOURS)
        if item % 3 == 2:
            title = f"{colour[1]}{adjective[1]}{chinese}"
        else:
            title = f"{adjective[0]} {english}, {colour[0]}"
        yield CatalogueItem(item_id=f"i{item}", title=title, category_path=(f"c{category}",),
                            price=float(names.randrange(5, 500)))


__all__ = ["PRODUCTS", "synthetic_catalogue"]
