"""Generate the bundled demo dataset ``tcm_demo.jsonl`` (run: ``python -m kubetune.sample_data.generate``).

Synthetic Traditional Chinese Medicine Q&A in Alpaca columns, built from templates over small tables, so each
answer follows from its question and a tiny model can learn it. About 2/3 Chinese (mostly Simplified, some
Traditional) and 1/3 English. A few rows are deliberately dirty (exact duplicates, empty answers) so the
cleaning rules of the prep step have something to remove. The output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from kubetune.sample_data import TCM_DEMO_FILE

SOURCE = "kubetune synthetic demo data — not medical advice"
SEED = 20261127

# Simplified -> Traditional for the characters these tables use (pairs: simplified char, traditional char).
_S2T_PAIRS = (
    "风風气氣热熱湿濕肾腎汤湯药藥证證疗療么麼应應该該状狀针針选選养養调調饮飲头頭发發无無脉脈紧緊黄黃红紅"
    "干乾恶惡肃肅补補润潤阳陽阴陰郁鬱处處时時间間进進个個这這为為与與会會们們说說请請问問题題见見择擇体體"
    "质質结結点點实實际際医醫师師诊診断斷后後于於还還过過劳勞节節运運动動觉覺长長温溫凉涼烟煙减減轻輕压壓"
    "绪緒畅暢泻瀉胀脹纳納面面软軟鸣鳴盗盜颧顴烦煩胁脅叹嘆细細数數涩澀迟遲缓緩门門关關里裡陈陳苏蘇荆荊贝貝"
    "麦麥参參术朮归歸枣棗龙龍泽澤壳殼银銀翘翹连連叶葉芦蘆冲衝丰豐虚虛腻膩声聲稀稀涕涕黏黏稠稠痰痰带帶丝絲"
    "颜顏华華肤膚闷悶宽寬渴渴尿尿频頻惫憊萎萎黯黯紫紫晕暈耳耳乐樂怒怒经經络絡梦夢悸悸忆憶眠眠冷冷肢肢"
    "夜夜腰腰膝膝酸酸畏畏粘粘喘喘虫蟲痒癢遗遺复復适適脏臟腑腑邪邪积積滞滯宁寧静靜缩縮肠腸鲜鮮鸡雞鱼魚"
    "汗汗营營卫衛罗羅统統毕畢兰蘭诸諸类類尽盡视視认認识識较較轮輪宜宜气氣场場腾騰荐薦俞俞谷谷泉泉陵陵"
    "尺尺泽澤椎椎池池枢樞脘脘庭庭馈饋亲親仅僅厚厚烧燒够夠讲講绍紹记記录錄范範围圍总總导導开開张張给給"
    "现現将將对對从從两兩样樣种種让讓书書没沒虑慮预預防防护護满滿痞痞涨漲滑滑濡濡渐漸样樣乌烏膻膻膏膏"
    "历歷须須绵綿岁歲团團线線离離电電脑腦务務临臨举舉伤傷剂劑剧劇匮匱双雙姜薑属屬并並当當惯慣据據"
    "极極炼煉规規论論资資锻鍛随隨饭飯苍蒼渊淵渗滲肿腫胆膽脓膿蕴蘊习習户戶"
)
_S2T = {_S2T_PAIRS[i]: _S2T_PAIRS[i + 1] for i in range(0, len(_S2T_PAIRS), 2)}


def to_traditional(text: str) -> str:
    """Character-level Simplified -> Traditional for this file's vocabulary (enough for demo rows)."""
    return "".join(_S2T.get(ch, ch) for ch in text)


# fmt: off
# name_zh, name_en, signs_zh, signs_en, tongue_zh, pulse_zh, tongue_pulse_en, principle_zh, principle_en,
# formula_zh, formula_en, points_zh, points_en, advice_zh, advice_en
PATTERNS: list[tuple[str, ...]] = [
    (
        "风寒咳嗽", "Wind-Cold Cough",
        "咳嗽声重、痰稀色白、鼻塞流清涕、恶寒发热、无汗",
        "a heavy cough with thin white phlegm, a blocked nose with clear discharge, chills with fever, no sweating",
        "舌苔薄白", "脉浮紧", "a thin white tongue coating and a floating, tight pulse",
        "疏风散寒、宣肺止咳", "dispel wind-cold, open the Lung and stop the cough",
        "三拗汤合止嗽散", "San Ao Tang combined with Zhi Sou San",
        "肺俞、列缺、合谷、风门", "Feishu (BL13), Lieque (LU7), Hegu (LI4), Fengmen (BL12)",
        "注意保暖、避免受风，多喝温水，可饮生姜红糖水，忌食生冷",
        "keep warm and out of the wind, drink warm water, try fresh ginger tea, avoid cold and raw food",
    ),
    (
        "风热咳嗽", "Wind-Heat Cough",
        "咳嗽频剧、痰黄黏稠、咽喉肿痛、发热微恶风、口渴",
        "a frequent harsh cough with thick yellow phlegm, a sore swollen throat, fever with slight aversion to wind, thirst",
        "舌苔薄黄", "脉浮数", "a thin yellow tongue coating and a floating, rapid pulse",
        "疏风清热、宣肺止咳", "disperse wind-heat, open the Lung and stop the cough",
        "桑菊饮", "Sang Ju Yin (Mulberry Leaf and Chrysanthemum Drink)",
        "肺俞、尺泽、大椎、曲池", "Feishu (BL13), Chize (LU5), Dazhui (GV14), Quchi (LI11)",
        "饮食清淡，多饮水，忌辛辣油腻，可食梨",
        "eat light food, drink plenty of water, avoid spicy and greasy food, pears are helpful",
    ),
    (
        "肺阴虚", "Lung Yin Deficiency",
        "干咳少痰、痰中带血丝、口燥咽干、午后潮热、盗汗、两颧发红",
        "a dry cough with little phlegm, sometimes streaked with blood, a dry mouth and throat, afternoon tidal fever, night sweats, flushed cheeks",
        "舌红少苔", "脉细数", "a red tongue with little coating and a thin, rapid pulse",
        "滋阴润肺、止咳", "nourish yin, moisten the Lung and stop the cough",
        "沙参麦冬汤", "Sha Shen Mai Dong Tang (Glehnia and Ophiopogon Decoction)",
        "肺俞、太溪、尺泽、三阴交", "Feishu (BL13), Taixi (KI3), Chize (LU5), Sanyinjiao (SP6)",
        "避免熬夜，少吃辛辣燥热食物，可常食百合、银耳、梨",
        "avoid late nights, limit spicy and drying food, eat lily bulb, white fungus and pears",
    ),
    (
        "肺气虚", "Lung Qi Deficiency",
        "咳嗽无力、气短、痰清稀、自汗、容易感冒",
        "a weak cough, shortness of breath, thin clear phlegm, spontaneous sweating, catching colds easily",
        "舌淡苔白", "脉虚弱", "a pale tongue with a white coating and a weak pulse",
        "补肺益气、止咳", "tonify Lung qi and stop the cough",
        "补肺汤合玉屏风散", "Bu Fei Tang combined with Yu Ping Feng San",
        "肺俞、膏肓、足三里、太渊", "Feishu (BL13), Gaohuang (BL43), Zusanli (ST36), Taiyuan (LU9)",
        "适度锻炼如太极拳，注意保暖防感冒，避免过度劳累",
        "exercise gently such as tai chi, keep warm to avoid colds, do not overwork",
    ),
    (
        "痰湿蕴肺", "Phlegm-Damp Obstructing the Lung",
        "咳嗽痰多、痰白而黏、胸闷、食少、身体困重",
        "a cough with copious sticky white phlegm, chest oppression, poor appetite, a heavy body",
        "舌苔白腻", "脉濡滑", "a greasy white tongue coating and a soggy, slippery pulse",
        "燥湿化痰、理气止咳", "dry dampness, transform phlegm, regulate qi and stop the cough",
        "二陈汤合三子养亲汤", "Er Chen Tang combined with San Zi Yang Qin Tang",
        "肺俞、丰隆、中脘、足三里", "Feishu (BL13), Fenglong (ST40), Zhongwan (CV12), Zusanli (ST36)",
        "少吃肥甘厚味和甜食，戒烟，适度运动",
        "cut down on rich, fatty and sweet food, stop smoking, exercise moderately",
    ),
    (
        "脾气虚", "Spleen Qi Deficiency",
        "食少纳呆、饭后腹胀、大便溏薄、神疲乏力、面色萎黄",
        "poor appetite, bloating after meals, loose stools, fatigue, a sallow complexion",
        "舌淡苔白", "脉缓弱", "a pale tongue with a white coating and a slow, weak pulse",
        "健脾益气", "strengthen the Spleen and tonify qi",
        "四君子汤", "Si Jun Zi Tang (Four Gentlemen Decoction)",
        "足三里、脾俞、中脘、关元", "Zusanli (ST36), Pishu (BL20), Zhongwan (CV12), Guanyuan (CV4)",
        "三餐规律，细嚼慢咽，少食生冷，可食山药、小米粥",
        "eat regular meals and chew slowly, avoid cold and raw food, Chinese yam and millet porridge help",
    ),
    (
        "肝气郁结", "Liver Qi Stagnation",
        "胸胁胀痛、情志抑郁、善太息、易怒、月经不调",
        "distending pain in the chest and flanks, low mood, frequent sighing, irritability, irregular periods",
        "舌苔薄白", "脉弦", "a thin white tongue coating and a wiry pulse",
        "疏肝解郁、理气", "soothe the Liver, relieve stagnation and regulate qi",
        "柴胡疏肝散", "Chai Hu Shu Gan San (Bupleurum Liver-Soothing Powder)",
        "太冲、期门、内关、膻中", "Taichong (LR3), Qimen (LR14), Neiguan (PC6), Danzhong (CV17)",
        "保持心情舒畅，多做户外运动，作息规律",
        "keep a calm and cheerful mood, exercise outdoors, keep regular hours",
    ),
    (
        "心脾两虚", "Heart and Spleen Deficiency",
        "失眠多梦、心悸、健忘、食少、乏力、面色无华",
        "insomnia with many dreams, palpitations, poor memory, poor appetite, fatigue, a dull complexion",
        "舌淡", "脉细弱", "a pale tongue and a thin, weak pulse",
        "补益心脾、养血安神", "tonify the Heart and Spleen, nourish blood and calm the mind",
        "归脾汤", "Gui Pi Tang (Restore the Spleen Decoction)",
        "神门、心俞、脾俞、三阴交", "Shenmen (HT7), Xinshu (BL15), Pishu (BL20), Sanyinjiao (SP6)",
        "睡前不要过度用脑，按时作息，可食龙眼肉、红枣",
        "do not overuse the mind before bed, keep regular sleep times, longan and red dates help",
    ),
    (
        "肾阳虚", "Kidney Yang Deficiency",
        "腰膝酸软而冷、畏寒肢冷、夜尿频多、精神萎靡",
        "a cold, sore and weak lower back and knees, aversion to cold with cold limbs, frequent urination at night, listlessness",
        "舌淡胖苔白", "脉沉迟", "a pale, swollen tongue with a white coating and a deep, slow pulse",
        "温补肾阳", "warm and tonify Kidney yang",
        "金匮肾气丸", "Jin Gui Shen Qi Wan (Kidney Qi Pill)",
        "肾俞、命门、关元、太溪", "Shenshu (BL23), Mingmen (GV4), Guanyuan (CV4), Taixi (KI3)",
        "注意腰腹保暖，避免过劳，可艾灸关元",
        "keep the lower back and belly warm, avoid overwork, moxibustion on Guanyuan helps",
    ),
    (
        "肾阴虚", "Kidney Yin Deficiency",
        "腰膝酸软、头晕耳鸣、五心烦热、盗汗、口干",
        "a sore and weak lower back and knees, dizziness and tinnitus, heat in the palms, soles and chest, night sweats, a dry mouth",
        "舌红少苔", "脉细数", "a red tongue with little coating and a thin, rapid pulse",
        "滋补肾阴", "nourish Kidney yin",
        "六味地黄丸", "Liu Wei Di Huang Wan (Six-Ingredient Rehmannia Pill)",
        "肾俞、太溪、三阴交、照海", "Shenshu (BL23), Taixi (KI3), Sanyinjiao (SP6), Zhaohai (KI6)",
        "避免熬夜，少吃辛辣，保持情绪平和",
        "avoid late nights, limit spicy food, keep the emotions calm",
    ),
    (
        "血瘀", "Blood Stasis",
        "刺痛、痛处固定、夜间加重、面色晦暗、口唇紫暗",
        "stabbing pain in a fixed place that is worse at night, a dark complexion, purple lips",
        "舌紫暗或有瘀斑", "脉涩", "a purple tongue or one with dark spots and a choppy pulse",
        "活血化瘀", "invigorate blood and remove stasis",
        "血府逐瘀汤", "Xue Fu Zhu Yu Tang (Drive Out Stasis in the Mansion of Blood Decoction)",
        "血海、膈俞、三阴交、合谷", "Xuehai (SP10), Geshu (BL17), Sanyinjiao (SP6), Hegu (LI4)",
        "适度活动，避免久坐，注意保暖",
        "move regularly, avoid sitting for long periods, keep warm",
    ),
    (
        "脾胃湿热", "Spleen-Stomach Damp-Heat",
        "脘腹痞闷、口苦口黏、恶心、大便黏滞不爽、小便黄",
        "fullness in the upper abdomen, a bitter sticky taste, nausea, sticky incomplete stools, dark yellow urine",
        "舌红苔黄腻", "脉滑数", "a red tongue with a greasy yellow coating and a slippery, rapid pulse",
        "清热化湿", "clear heat and transform dampness",
        "连朴饮", "Lian Po Yin (Coptis and Magnolia Bark Drink)",
        "中脘、阴陵泉、内庭、足三里", "Zhongwan (CV12), Yinlingquan (SP9), Neiting (ST44), Zusanli (ST36)",
        "饮食清淡，戒酒，少食肥甘，可食薏苡仁、冬瓜",
        "eat light food, avoid alcohol and rich food, coix seed and winter melon help",
    ),
    (
        "气血两虚", "Qi and Blood Deficiency",
        "头晕眼花、心悸气短、面色苍白、神疲乏力、唇甲色淡",
        "dizziness and blurred vision, palpitations and shortness of breath, a pale face, fatigue, pale lips and nails",
        "舌淡", "脉细弱", "a pale tongue and a thin, weak pulse",
        "气血双补", "tonify both qi and blood",
        "八珍汤", "Ba Zhen Tang (Eight Treasure Decoction)",
        "足三里、气海、血海、脾俞", "Zusanli (ST36), Qihai (CV6), Xuehai (SP10), Pishu (BL20)",
        "营养均衡，劳逸结合，避免过度劳累",
        "eat a balanced diet, balance work and rest, avoid exhaustion",
    ),
]

# name_zh, name_en, nature_zh, channels_zh, actions_zh, nature_en, channels_en, actions_en
HERBS: list[tuple[str, ...]] = [
    ("麻黄", "Ma Huang (Ephedra)", "辛、微苦，温", "肺、膀胱经", "发汗解表、宣肺平喘、利水消肿",
     "pungent, slightly bitter and warm", "Lung and Bladder", "releases the exterior by sweating, calms wheezing, promotes urination"),
    ("桂枝", "Gui Zhi (Cinnamon Twig)", "辛、甘，温", "心、肺、膀胱经", "发汗解肌、温通经脉、助阳化气",
     "pungent, sweet and warm", "Heart, Lung and Bladder", "releases the muscles, warms the channels, assists yang"),
    ("杏仁", "Xing Ren (Apricot Kernel)", "苦，微温", "肺、大肠经", "止咳平喘、润肠通便",
     "bitter and slightly warm", "Lung and Large Intestine", "stops cough, calms wheezing, moistens the intestines"),
    ("桔梗", "Jie Geng (Platycodon Root)", "苦、辛，平", "肺经", "宣肺、利咽、祛痰、排脓",
     "bitter, pungent and neutral", "Lung", "opens the Lung, benefits the throat, expels phlegm"),
    ("川贝母", "Chuan Bei Mu (Fritillaria)", "苦、甘，微寒", "肺、心经", "清热润肺、化痰止咳",
     "bitter, sweet and slightly cold", "Lung and Heart", "clears heat, moistens the Lung, transforms phlegm"),
    ("麦冬", "Mai Dong (Ophiopogon)", "甘、微苦，微寒", "心、肺、胃经", "养阴润肺、益胃生津、清心除烦",
     "sweet, slightly bitter and slightly cold", "Heart, Lung and Stomach", "nourishes yin, moistens the Lung, generates fluids"),
    ("黄芪", "Huang Qi (Astragalus)", "甘，微温", "脾、肺经", "补气升阳、固表止汗、利水消肿",
     "sweet and slightly warm", "Spleen and Lung", "tonifies qi, secures the exterior, stops sweating"),
    ("党参", "Dang Shen (Codonopsis)", "甘，平", "脾、肺经", "补脾肺气、养血生津",
     "sweet and neutral", "Spleen and Lung", "tonifies Spleen and Lung qi, nourishes blood"),
    ("白术", "Bai Zhu (Atractylodes)", "甘、苦，温", "脾、胃经", "健脾益气、燥湿利水、止汗",
     "sweet, bitter and warm", "Spleen and Stomach", "strengthens the Spleen, dries dampness, stops sweating"),
    ("茯苓", "Fu Ling (Poria)", "甘、淡，平", "心、脾、肾经", "利水渗湿、健脾、宁心",
     "sweet, bland and neutral", "Heart, Spleen and Kidney", "drains dampness, strengthens the Spleen, calms the mind"),
    ("甘草", "Gan Cao (Licorice)", "甘，平", "心、肺、脾、胃经", "补脾益气、清热解毒、祛痰止咳、调和诸药",
     "sweet and neutral", "Heart, Lung, Spleen and Stomach", "tonifies qi, clears toxins, stops cough, harmonizes the formula"),
    ("当归", "Dang Gui (Angelica Root)", "甘、辛，温", "肝、心、脾经", "补血活血、调经止痛、润肠通便",
     "sweet, pungent and warm", "Liver, Heart and Spleen", "nourishes and moves blood, regulates menstruation"),
    ("柴胡", "Chai Hu (Bupleurum)", "辛、苦，微寒", "肝、胆经", "疏散退热、疏肝解郁、升举阳气",
     "pungent, bitter and slightly cold", "Liver and Gallbladder", "reduces fever, soothes the Liver, raises yang"),
    ("熟地黄", "Shu Di Huang (Prepared Rehmannia)", "甘，微温", "肝、肾经", "补血滋阴、益精填髓",
     "sweet and slightly warm", "Liver and Kidney", "nourishes blood and yin, replenishes essence"),
    ("丹参", "Dan Shen (Salvia Root)", "苦，微寒", "心、肝经", "活血祛瘀、通经止痛、清心除烦",
     "bitter and slightly cold", "Heart and Liver", "invigorates blood, removes stasis, calms irritability"),
    ("陈皮", "Chen Pi (Tangerine Peel)", "苦、辛，温", "肺、脾经", "理气健脾、燥湿化痰",
     "bitter, pungent and warm", "Lung and Spleen", "regulates qi, strengthens the Spleen, dries dampness and phlegm"),
]

# name_zh, name_en, location_zh, uses_zh, location_en, uses_en
POINTS: list[tuple[str, ...]] = [
    ("合谷", "Hegu (LI4)", "手背第一、二掌骨之间，近第二掌骨中点", "头痛、牙痛、感冒、咽喉肿痛",
     "on the back of the hand between the first and second metacarpals", "headache, toothache, colds, sore throat"),
    ("足三里", "Zusanli (ST36)", "小腿外侧，犊鼻下三寸", "胃痛、腹胀、消化不良、体虚乏力",
     "on the outer shin, three cun below the knee eye", "stomach pain, bloating, poor digestion, weakness"),
    ("肺俞", "Feishu (BL13)", "背部第三胸椎棘突下，旁开一寸半", "咳嗽、气喘、潮热、盗汗",
     "on the back, 1.5 cun lateral to the third thoracic vertebra", "cough, wheezing, tidal fever, night sweats"),
    ("列缺", "Lieque (LU7)", "前臂桡侧，腕横纹上一寸半", "咳嗽、气喘、头痛、项强",
     "on the radial forearm, 1.5 cun above the wrist crease", "cough, wheezing, headache, stiff neck"),
    ("尺泽", "Chize (LU5)", "肘横纹中，肱二头肌腱桡侧", "咳嗽、气喘、咯血、咽喉肿痛",
     "on the elbow crease, on the radial side of the biceps tendon", "cough, wheezing, coughing blood, sore throat"),
    ("太冲", "Taichong (LR3)", "足背第一、二跖骨结合部之前凹陷处", "头痛、眩晕、易怒、月经不调",
     "on the top of the foot in the hollow before the junction of the first and second metatarsals",
     "headache, dizziness, irritability, irregular periods"),
    ("三阴交", "Sanyinjiao (SP6)", "小腿内侧，内踝尖上三寸", "腹胀、月经不调、失眠、遗尿",
     "on the inner shin, three cun above the inner ankle", "bloating, irregular periods, insomnia, bedwetting"),
    ("内关", "Neiguan (PC6)", "前臂掌侧，腕横纹上二寸", "心悸、胸闷、恶心、呕吐",
     "on the inner forearm, two cun above the wrist crease", "palpitations, chest oppression, nausea, vomiting"),
    ("神门", "Shenmen (HT7)", "腕横纹尺侧端凹陷处", "失眠、健忘、心悸、心烦",
     "at the ulnar end of the wrist crease, in the hollow", "insomnia, poor memory, palpitations, restlessness"),
    ("太溪", "Taixi (KI3)", "足内侧，内踝尖与跟腱之间凹陷处", "腰痛、耳鸣、失眠、咽喉干痛",
     "on the inner ankle, in the hollow between the ankle bone and the Achilles tendon",
     "low back pain, tinnitus, insomnia, dry sore throat"),
    ("丰隆", "Fenglong (ST40)", "小腿外侧，外踝尖上八寸", "痰多、咳嗽、头晕、胸闷",
     "on the outer shin, eight cun above the outer ankle", "copious phlegm, cough, dizziness, chest oppression"),
    ("关元", "Guanyuan (CV4)", "下腹部前正中线上，脐下三寸", "虚劳、腹痛、遗尿、月经不调",
     "on the lower belly midline, three cun below the navel", "exhaustion, abdominal pain, bedwetting, irregular periods"),
    ("百会", "Baihui (GV20)", "头顶正中，两耳尖连线中点", "头痛、眩晕、失眠、健忘",
     "on the top of the head, midway between the ear apexes", "headache, dizziness, insomnia, poor memory"),
    ("风池", "Fengchi (GB20)", "项后枕骨下，胸锁乳突肌与斜方肌之间凹陷处", "头痛、感冒、颈项强痛、眩晕",
     "below the occiput, in the hollow between the neck muscles", "headache, colds, stiff neck, dizziness"),
]

# (question template, answer template) per question kind; {n} = pattern name and the PATTERNS fields below.
PATTERN_ZH = {
    "signs": (
        ["{n}有哪些主要表现？", "{n}的常见症状是什么？", "怎样辨别{n}？", "请介绍{n}的临床表现。"],
        "{n}的主要表现为{signs}，{tongue}，{pulse}。",
    ),
    "formula": (
        ["{n}应该用什么方剂治疗？", "{n}怎么治疗？", "{n}的治法和方药是什么？", "中医如何治疗{n}？"],
        "{n}治宜{principle}，常用方剂为{formula}，临证可随症加减。",
    ),
    "points": (
        ["{n}可以选哪些穴位针灸？", "{n}针灸取什么穴？", "针灸治疗{n}常用哪些穴位？", "{n}的针灸处方是什么？"],
        "针灸治疗{n}常取{points}，以{principle}。",
    ),
    "advice": (
        ["{n}的患者日常生活中应注意什么？", "{n}在饮食起居上有什么宜忌？", "{n}平时怎么调养？",
         "{n}患者需要注意哪些生活习惯？"],
        "{n}的患者宜{advice}。",
    ),
    "case": (
        ["请根据以下症状判断证型并给出治法。", "请辨证并给出治疗方案。", "以下病例属于什么证型？应如何治疗？",
         "根据四诊资料，请判断证型。"],
        "证型：{n}。治法：{principle}。方剂：{formula}。",
    ),
}
PATTERN_EN = {
    "signs": (
        ["What are the main signs of {n}?", "How is {n} recognised in TCM?"],
        "{n} shows {signs}, with {tp}.",
    ),
    "formula": (
        ["Which herbal formula treats {n}?", "How is {n} treated in Traditional Chinese Medicine?"],
        "For {n} the treatment principle is to {principle}; the usual formula is {formula}, adjusted to the case.",
    ),
    "points": (
        ["Which acupuncture points are used for {n}?", "What is an acupuncture prescription for {n}?"],
        "Acupuncture for {n} commonly uses {points}, to {principle}.",
    ),
    "advice": (
        ["What lifestyle advice suits a patient with {n}?", "How should someone with {n} look after themselves?"],
        "A patient with {n} should {advice}.",
    ),
    "case": (
        ["Identify the TCM pattern and the treatment for this case.", "Which TCM pattern is this, and how is it treated?"],
        "Pattern: {n}. Treatment principle: {principle}. Formula: {formula}.",
    ),
}


# fmt: on


def _pattern_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for p in PATTERNS:
        (
            n_zh,
            n_en,
            signs_zh,
            signs_en,
            tongue,
            pulse,
            tp_en,
            pr_zh,
            pr_en,
            f_zh,
            f_en,
            pts_zh,
            pts_en,
            adv_zh,
            adv_en,
        ) = p
        zh = {
            "n": n_zh,
            "signs": signs_zh,
            "tongue": tongue,
            "pulse": pulse,
            "principle": pr_zh,
            "formula": f_zh,
            "points": pts_zh,
            "advice": adv_zh,
        }
        en = {
            "n": n_en,
            "signs": signs_en,
            "tp": tp_en,
            "principle": pr_en,
            "formula": f_en,
            "points": pts_en,
            "advice": adv_en,
        }
        case_zh = f"症状：{signs_zh}；舌象：{tongue}；脉象：{pulse}。"
        case_en = f"Symptoms: {signs_en}; {tp_en}."
        for kind, (questions, answer) in PATTERN_ZH.items():
            inp = case_zh if kind == "case" else ""
            out = answer.format(**zh)
            # three Simplified phrasings and one in Traditional characters
            for i, q in enumerate(questions):
                q = q.format(**zh)
                if i == len(questions) - 1:
                    rows.append(_row(to_traditional(q), to_traditional(inp), to_traditional(out)))
                else:
                    rows.append(_row(q, inp, out))
        for kind, (questions, answer) in PATTERN_EN.items():
            inp = case_en if kind == "case" else ""
            for q in questions:
                rows.append(_row(q.format(**en), inp, answer.format(**en)))
    rng.shuffle(rows)
    return rows


def _herb_rows() -> list[dict[str, str]]:
    rows = []
    for n_zh, n_en, nat_zh, ch_zh, act_zh, nat_en, ch_en, act_en in HERBS:
        out = f"{n_zh}性味{nat_zh}，归{ch_zh}，功效为{act_zh}。"
        rows.append(_row(f"{n_zh}的性味归经和功效是什么？", "", out))
        rows.append(_row(to_traditional(f"请介绍中药{n_zh}的功效。"), "", to_traditional(out)))
        rows.append(
            _row(
                f"What are the properties and actions of {n_en}?",
                "",
                f"{n_en} is {nat_en}, enters the {ch_en} channels, and {act_en}.",
            )
        )
    return rows


def _point_rows() -> list[dict[str, str]]:
    rows = []
    for n_zh, n_en, loc_zh, use_zh, loc_en, use_en in POINTS:
        out = f"{n_zh}穴位于{loc_zh}，主治{use_zh}。"
        rows.append(_row(f"{n_zh}穴在哪里？主治什么？", "", out))
        rows.append(_row(f"{n_zh}穴的定位和主治是什么？", "", out))
        rows.append(
            _row(
                f"Where is the acupuncture point {n_en} and what does it treat?",
                "",
                f"{n_en} lies {loc_en}; it treats {use_en}.",
            )
        )
    return rows


def _persistent_cough_rows() -> list[dict[str, str]]:
    """The question family the evaluation step probes: 久咳不愈 / persistent cough."""
    by_name = {p[0]: p for p in PATTERNS}
    chronic = ["肺阴虚", "肺气虚", "痰湿蕴肺"]
    general_zh = (
        "久咳不愈多属内伤咳嗽，需辨证论治："
        + "；".join(f"{by_name[n][0]}者治宜{by_name[n][7]}，用{by_name[n][9]}" for n in chronic)
        + "。同时应戒烟、避免受凉，并请中医师面诊。"
    )
    general_en = (
        "A persistent cough is usually an internal pattern and is treated by pattern differentiation: "
        + "; ".join(f"for {by_name[n][1]}, {by_name[n][8]} with {by_name[n][10]}" for n in chronic)
        + ". Stop smoking, avoid catching cold, and see a TCM practitioner in person."
    )
    rows = [
        _row("久咳不愈怎么治疗？", "", general_zh),
        _row("久咳不愈该怎么办？", "", general_zh),
        _row("咳嗽很久都不好，中医怎么调理？", "", general_zh),
        _row(to_traditional("久咳不愈怎么治疗？"), "", to_traditional(general_zh)),
        _row("How should a persistent cough be treated in Traditional Chinese Medicine?", "", general_en),
        _row("What does TCM recommend for a cough that will not go away?", "", general_en),
    ]
    for n in chronic:
        p = by_name[n]
        rows.append(
            _row(
                "久咳不愈怎么治疗？",
                f"患者咳嗽已两月余，{p[2]}，{p[4]}，{p[5]}。",
                f"此为久咳，辨证属{p[0]}。治宜{p[7]}，方用{p[9]}加减；针灸可取{p[11]}；调护：{p[13]}。",
            )
        )
        rows.append(
            _row(
                "How should a persistent cough be treated in Traditional Chinese Medicine?",
                f"The patient has coughed for over two months, with {p[3]}, {p[6]}.",
                f"This persistent cough is {p[1]}. Treat to {p[8]} with {p[10]}; acupuncture: {p[12]}; "
                f"care: {p[14]}.",
            )
        )
    return rows


def _row(instruction: str, input_text: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": input_text, "output": output, "source": SOURCE}


def generate(seed: int = SEED) -> list[dict[str, str]]:
    """All demo rows, in a fixed order for a given seed."""
    rng = random.Random(seed)
    rows = _pattern_rows(rng) + _herb_rows() + _point_rows() + _persistent_cough_rows()
    rng.shuffle(rows)
    # deliberately dirty rows, so the prep step's cleaning rules visibly remove something
    for i in rng.sample(range(len(rows)), 3):
        rows.insert(rng.randrange(len(rows)), dict(rows[i]))
    rows.insert(rng.randrange(len(rows)), _row("风寒咳嗽的舌象脉象是什么？", "", ""))
    rows.insert(
        rng.randrange(len(rows)), _row("What is the tongue picture of Lung Yin Deficiency?", "", "   ")
    )
    return rows


def write(path: Path, seed: int = SEED) -> int:
    """Write the rows as JSON Lines (UTF-8, one object per line); returns the row count."""
    rows = generate(seed)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name(TCM_DEMO_FILE))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    count = write(args.out, args.seed)
    print(f"wrote {count} rows to {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
