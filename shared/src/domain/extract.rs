//! `POST /preset/extract-from-text` (contract §6.9): a deterministic parser
//! that maps a description onto the fields and enums of an instruction of
//! one job kind. It says only what the text says: a field appears when a
//! phrase of its vocabulary does, and whatever it did not recognise stays,
//! in the text's own words, in `prompt`.

use super::presets::PresetType;
use serde_json::{Map, Value, json};

/// What the parser made of a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub instruction_data: Value,
    pub suggested_name: Option<String>,
    pub suggested_description: Option<String>,
}

/// A phrase of a vocabulary and the value it stands for.
type Vocab = &'static [(&'static [&'static str], &'static str)];

const STYLES: Vocab = &[
    (&["ghost mannequin", "invisible mannequin", "hollow man", "ghost"], "ghost_mannequin"),
    (&["flat lay", "flat-lay", "flatlay", "laid flat"], "flat_lay"),
    (&["white cutout", "cutout", "cut-out", "white background", "e-commerce", "ecommerce", "marketplace"], "white_cutout"),
    (&["lifestyle", "marketing", "campaign", "editorial", "in a scene", "in situ"], "marketing_ready"),
];
const SHADOWS: Vocab = &[
    (&["no shadow", "without shadow", "without a shadow", "shadowless"], "none"),
    (&["contact shadow", "grounded shadow"], "contact"),
    (&["soft drop shadow", "drop shadow", "soft shadow", "soft drop"], "soft_drop"),
    (&["natural shadow", "natural shadows"], "natural"),
];
const FRAMINGS: Vocab = &[
    (&["square", "1:1"], "square_packshot"),
    (&["portrait format", "vertical", "tall", "3:4"], "tall_3_4"),
    (&["landscape format", "horizontal", "wide", "4:3"], "wide_4_3"),
    (&["full frame", "full-frame", "edge to edge"], "full_frame"),
];
const ANGLES: Vocab = &[
    (&["three-quarter", "three quarter", "3/4 view"], "three_quarter"),
    (&["top-down", "top down", "overhead", "bird's eye", "from above"], "top_down"),
    (&["back view", "from behind", "rear view"], "back"),
    (&["close-up", "close up", "macro", "detail shot"], "detail_macro"),
    (&["front view", "frontal", "straight on", "from the front"], "front"),
];
const LIGHTS: Vocab = &[
    (&["golden hour", "sunset light", "warm light"], "warm golden-hour light"),
    (&["soft light", "softbox", "diffused light", "diffused"], "soft diffused light"),
    (&["hard light", "harsh light", "direct sun", "direct sunlight"], "hard direct light"),
    (&["window light", "daylight", "natural light"], "natural daylight"),
    (&["studio light", "studio lighting"], "studio lighting"),
    (&["moody", "low key", "low-key", "dramatic light"], "moody low-key light"),
];
const LIGHT_SIDES: Vocab = &[
    (&["from the left", "left side light", "lit from the left"], "from the left"),
    (&["from the right", "right side light", "lit from the right"], "from the right"),
    (&["backlit", "backlight", "from behind the subject"], "from behind"),
];
const SURFACES: &[&str] = &[
    "linen", "marble", "wood", "wooden", "concrete", "paper", "sand", "terrazzo", "velvet", "stone",
    "slate", "silk", "cotton", "tiles", "tile", "bed sheet", "wool",
];
/// Colour names and synonyms → the name the platform uses.
const COLOURS: Vocab = &[
    (&["navy"], "navy blue"),
    (&["crimson", "scarlet", "red"], "red"),
    (&["burgundy", "maroon", "wine"], "burgundy"),
    (&["pink", "rose", "blush"], "pink"),
    (&["orange", "tangerine"], "orange"),
    (&["yellow", "mustard", "lemon"], "yellow"),
    (&["olive", "khaki"], "olive"),
    (&["green", "emerald", "sage", "mint"], "green"),
    (&["teal", "turquoise"], "teal"),
    (&["blue", "cobalt", "azure", "denim"], "blue"),
    (&["purple", "violet", "lilac", "lavender"], "purple"),
    (&["brown", "chocolate", "camel", "tan"], "brown"),
    (&["beige", "cream", "ecru", "sand-coloured", "nude"], "beige"),
    (&["white", "ivory", "off-white"], "white"),
    (&["grey", "gray", "charcoal", "silver"], "grey"),
    (&["black", "jet"], "black"),
    (&["gold", "golden"], "gold"),
];
const POSES: Vocab = &[
    (&["walking"], "walking"),
    (&["running"], "running"),
    (&["sitting", "seated"], "seated"),
    (&["leaning"], "leaning"),
    (&["jumping"], "jumping"),
    (&["twirling", "spinning"], "twirling"),
    (&["hands in pockets", "hands in her pockets", "hands in his pockets"], "hands in pockets"),
    (&["arms crossed", "crossed arms"], "arms crossed"),
    (&["standing"], "standing"),
];
const CAMERAS: Vocab = &[
    (&["full body", "full-body", "full length", "full-length"], "full body"),
    (&["waist up", "half body", "half-body", "medium shot"], "waist up"),
    (&["close-up", "close up", "headshot", "portrait shot"], "close-up"),
    (&["low angle", "from below"], "low angle"),
    (&["eye level", "eye-level"], "eye level"),
    (&["35mm"], "35mm"),
    (&["50mm"], "50mm"),
    (&["85mm"], "85mm"),
];
const PLACES: &[&str] = &[
    "street", "beach", "studio", "park", "cafe", "café", "rooftop", "forest", "desert", "city",
    "garden", "loft", "field", "mountains", "pool", "office", "runway",
];
const GENDERS: Vocab = &[
    (&["woman", "female", "girl", "lady"], "female"),
    (&["man", "male", "guy", "gentleman"], "male"),
    (&["non-binary", "nonbinary", "androgynous"], "non-binary"),
];
const BUILDS: Vocab = &[
    (&["athletic", "sporty", "muscular"], "athletic"),
    (&["slim", "slender", "thin"], "slim"),
    (&["curvy"], "curvy"),
    (&["plus-size", "plus size"], "plus-size"),
    (&["petite"], "petite"),
];
const EXPRESSIONS: Vocab = &[
    (&["smiling", "smile", "happy"], "smiling"),
    (&["serious", "stern"], "serious"),
    (&["neutral expression", "neutral"], "neutral"),
    (&["relaxed", "calm"], "relaxed"),
    (&["confident"], "confident"),
];
const ETHNICITIES: Vocab = &[
    (&["east asian"], "East Asian"),
    (&["south asian"], "South Asian"),
    (&["southeast asian"], "Southeast Asian"),
    (&["middle eastern"], "Middle Eastern"),
    (&["latina", "latino", "hispanic"], "Latin American"),
    (&["black", "african"], "Black"),
    (&["white", "caucasian", "european"], "White"),
];
const HAIR_COLOURS: Vocab = &[
    (&["platinum blonde", "platinum"], "platinum blonde"),
    (&["blonde", "blond"], "blonde"),
    (&["brunette"], "brown"),
    (&["redhead", "ginger", "red hair", "red-haired"], "red"),
    (&["auburn"], "auburn"),
    (&["black hair", "black-haired", "jet black"], "black"),
    (&["brown hair", "brown-haired"], "brown"),
    (&["grey hair", "gray hair", "silver hair", "grey-haired", "gray-haired"], "grey"),
];
const HAIR_LENGTHS: Vocab = &[
    (&["shoulder-length", "shoulder length"], "shoulder length"),
    (&["pixie", "buzz cut", "cropped hair", "short hair", "short-haired"], "short"),
    (&["bob"], "bob"),
    (&["long hair", "long-haired", "long"], "long"),
    (&["short"], "short"),
];
const HAIR_STYLES: Vocab = &[
    (&["curly", "curls"], "curly"),
    (&["wavy", "waves"], "wavy"),
    (&["straight hair"], "straight"),
    (&["braids", "braided"], "braided"),
    (&["bun"], "bun"),
    (&["ponytail"], "ponytail"),
    (&["afro"], "afro"),
    (&["slicked back", "slicked-back"], "slicked back"),
];
const EYES: Vocab = &[
    (&["blue eyes", "blue-eyed"], "blue"),
    (&["green eyes", "green-eyed"], "green"),
    (&["brown eyes", "brown-eyed"], "brown"),
    (&["hazel eyes", "hazel"], "hazel"),
    (&["grey eyes", "gray eyes"], "grey"),
];
const FACIAL_HAIR: Vocab = &[
    (&["full beard", "beard", "bearded"], "beard"),
    (&["moustache", "mustache"], "moustache"),
    (&["stubble"], "stubble"),
    (&["clean-shaven", "clean shaven"], "clean-shaven"),
];
const MAKEUP: Vocab = &[
    (&["no makeup", "no make-up", "bare-faced"], "none"),
    (&["natural makeup", "minimal makeup"], "natural"),
    (&["bold lipstick", "red lipstick", "bold makeup", "smoky eyes"], "bold"),
];
const SIZES: Vocab = &[(&["4k"], "4K"), (&["2k", "high resolution", "hi-res"], "2K"), (&["1k"], "1K")];
const FORMATS: Vocab = &[(&["png", "transparent"], "png"), (&["jpeg", "jpg"], "jpg")];
const RATIOS: &[&str] = &["16:9", "9:16", "4:5", "5:4", "3:2", "2:3", "21:9", "3:4", "4:3", "1:1"];

/// The text, lower-cased with single spaces, and a record of what was used.
struct Text {
    lower: String,
    /// Byte ranges of `lower` a vocabulary claimed.
    used: Vec<(usize, usize)>,
}

impl Text {
    fn new(text: &str) -> Text {
        Text {
            lower: text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase(),
            used: Vec::new(),
        }
    }

    /// Where `phrase` occurs as whole words, if it does.
    fn find(&self, phrase: &str) -> Option<usize> {
        let mut from = 0;
        while let Some(i) = self.lower[from..].find(phrase) {
            let at = from + i;
            let end = at + phrase.len();
            let before = self.lower[..at].chars().next_back();
            let after = self.lower[end..].chars().next();
            let edge = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric());
            if edge(before) && edge(after) {
                return Some(at);
            }
            from = end;
        }
        None
    }

    /// The value of the first entry (in the vocabulary's order) one of
    /// whose phrases the text contains; its phrase is marked used.
    fn first(&mut self, vocab: Vocab) -> Option<&'static str> {
        for (phrases, value) in vocab {
            for p in *phrases {
                if let Some(at) = self.find(p) {
                    self.used.push((at, at + p.len()));
                    return Some(value);
                }
            }
        }
        None
    }

    /// Every entry the text mentions, in the order the text does.
    fn all(&mut self, vocab: Vocab) -> Vec<&'static str> {
        let mut hits: Vec<(usize, &'static str)> = Vec::new();
        for (phrases, value) in vocab {
            for p in *phrases {
                if let Some(at) = self.find(p) {
                    if !self.overlaps(at, at + p.len()) {
                        self.used.push((at, at + p.len()));
                        hits.push((at, value));
                    }
                    break;
                }
            }
        }
        hits.sort_by_key(|(at, _)| *at);
        let mut out: Vec<&'static str> = Vec::new();
        for (_, v) in hits {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }

    fn word(&mut self, words: &[&'static str]) -> Option<&'static str> {
        let mut best: Option<(usize, &'static str)> = None;
        for w in words {
            if let Some(at) = self.find(w)
                && best.is_none_or(|(b, _)| at < b)
            {
                best = Some((at, w));
            }
        }
        let (at, w) = best?;
        self.used.push((at, at + w.len()));
        Some(w)
    }

    fn overlaps(&self, a: usize, b: usize) -> bool {
        self.used.iter().any(|(x, y)| a < *y && *x < b)
    }

    /// An age: "30-year-old", "aged 30", "in her 30s" (the middle of the
    /// decade); the phrase is marked used.
    fn age(&mut self) -> Option<u32> {
        let words: Vec<String> = self.lower.split(' ').map(String::from).collect();
        let mut found: Option<(u32, String)> = None;
        for (i, w) in words.iter().enumerate() {
            let clean = w.trim_matches(|c: char| !c.is_alphanumeric() && c != '-');
            if let Some(n) = clean.strip_suffix("-year-old").and_then(|n| n.parse::<u32>().ok()) {
                found = Some((n, clean.to_string()));
                break;
            }
            if (w == "aged" || w == "age")
                && let Some(next) = words.get(i + 1)
            {
                let digits = next.trim_matches(|c: char| !c.is_ascii_digit());
                if let Ok(n) = digits.parse::<u32>() {
                    found = Some((n, format!("{w} {digits}")));
                    break;
                }
            }
            if let Some(d) = clean.strip_suffix('s').and_then(|d| d.parse::<u32>().ok())
                && (20..=90).contains(&d)
                && d % 10 == 0
                && i > 0
                && matches!(words[i - 1].as_str(), "her" | "his" | "their" | "early" | "mid" | "late")
            {
                found = Some((d + 5, format!("{} {clean}", words[i - 1])));
                break;
            }
        }
        let (age, phrase) = found?;
        if let Some(at) = self.find(&phrase) {
            self.used.push((at, at + phrase.len()));
        }
        Some(age)
    }

    /// The words no vocabulary claimed, in their order (the rest of the
    /// description), from the original text.
    fn rest(&self, original: &str) -> String {
        let normal = original.split_whitespace().collect::<Vec<_>>().join(" ");
        // Lower-casing keeps ASCII byte offsets; for anything else the
        // whole text stays in the prompt.
        if normal.len() != self.lower.len() {
            return normal;
        }
        let mut out = String::new();
        for (i, c) in normal.char_indices() {
            if !self.used.iter().any(|(a, b)| i >= *a && i < *b) {
                out.push(c);
            }
        }
        let words: Vec<&str> = out
            .split(|c: char| c.is_whitespace())
            .map(|w| w.trim_matches(|c: char| c == ',' || c == ';'))
            .filter(|w| !w.is_empty())
            .filter(|w| !matches!(w.to_lowercase().as_str(), "a" | "an" | "the" | "with" | "and" | "in" | "on" | "of" | "for"))
            .collect();
        // A rest made only of filler says nothing.
        words.join(" ")
    }
}

fn put(m: &mut Map<String, Value>, k: &str, v: Option<&str>) {
    if let Some(v) = v {
        m.insert(k.into(), json!(v));
    }
}

/// Parses `text` into an instruction of type `t`.
pub fn from_text(text: &str, t: PresetType) -> Extracted {
    let mut x = Text::new(text);
    let mut d = Map::new();
    let mut traits: Vec<String> = Vec::new();
    match t {
        PresetType::CreatePackshot => {
            let style = x.first(STYLES);
            put(&mut d, "style", style);
            put(&mut d, "shadow", x.first(SHADOWS));
            put(&mut d, "angle", x.first(ANGLES));
            put(&mut d, "framing", x.first(FRAMINGS));
            if let Some(s) = x.word(SURFACES) {
                d.insert("surface".into(), json!(s));
            }
            lighting(&mut x, &mut d);
            let colours = x.all(COLOURS);
            if !colours.is_empty() {
                d.insert("color_palette".into(), json!(colours.join(", ")));
            }
            if let Some(s) = style {
                traits.push(s.replace('_', " "));
            }
        }
        PresetType::Flat2Model => {
            let pose = x.all(POSES);
            if !pose.is_empty() {
                d.insert("pose".into(), json!(pose.join(", ")));
                traits.push(pose.join(", "));
            }
            let camera = x.all(CAMERAS);
            if !camera.is_empty() {
                d.insert("camera".into(), json!(camera.join(", ")));
            }
            if let Some(p) = x.word(PLACES) {
                d.insert("background".into(), json!(p));
                traits.push(p.to_string());
            }
            lighting(&mut x, &mut d);
        }
        PresetType::IdentityCreation => {
            let mut appearance = Map::new();
            put(&mut appearance, "gender", x.first(GENDERS));
            if let Some(a) = x.age() {
                appearance.insert("age".into(), json!(a));
            }
            put(&mut appearance, "ethnicity", x.first(ETHNICITIES));
            put(&mut appearance, "build", x.first(BUILDS));
            put(&mut appearance, "expression", x.first(EXPRESSIONS));
            let mut hair = Map::new();
            put(&mut hair, "color", x.first(HAIR_COLOURS));
            put(&mut hair, "length", x.first(HAIR_LENGTHS));
            put(&mut hair, "style", x.first(HAIR_STYLES));
            let mut face = Map::new();
            put(&mut face, "eyes", x.first(EYES));
            put(&mut face, "facial_hair", x.first(FACIAL_HAIR));
            put(&mut face, "makeup", x.first(MAKEUP));
            if let Some(at) = x.find("freckles") {
                x.used.push((at, at + "freckles".len()));
                face.insert("marks".into(), json!("freckles"));
            }
            for (k, g) in [("appearance", appearance), ("face", face), ("hair", hair)] {
                if !g.is_empty() {
                    d.insert(k.into(), Value::Object(g));
                }
            }
            for k in ["gender", "ethnicity"] {
                if let Some(v) = d.get("appearance").and_then(|a| a[k].as_str()) {
                    traits.push(v.to_string());
                }
            }
        }
        PresetType::ModelSwap => {
            put(
                &mut d,
                "model",
                x.first(&[(&["onda"], "onda"), (&["nano banana pro", "nano_banana_pro"], "nano_banana_pro")]),
            );
        }
    }
    // Output options every instruction kind takes.
    if t != PresetType::ModelSwap {
        let mut options = Map::new();
        put(&mut options, "size", x.first(SIZES));
        put(&mut options, "format", x.first(FORMATS));
        if let Some(r) = RATIOS.iter().find(|r| x.find(r).is_some()) {
            if !matches!(d.get("framing").and_then(Value::as_str), Some(_)) || !matches!(*r, "1:1" | "3:4" | "4:3") {
                options.insert("ar".into(), json!(r));
            }
            if let Some(at) = x.find(r) {
                x.used.push((at, at + r.len()));
            }
        }
        if !options.is_empty() {
            d.insert("options".into(), Value::Object(options));
        }
        // An identity's `prompt` is an expert prompt that replaces the
        // groups: the rest of its description is not one.
        let rest = x.rest(text);
        if !rest.is_empty() && t != PresetType::IdentityCreation {
            d.insert("prompt".into(), json!(rest));
        }
    }
    let trimmed = text.trim();
    Extracted {
        instruction_data: Value::Object(d),
        suggested_name: (!traits.is_empty()).then(|| {
            let mut n = traits.join(", ");
            if let Some(f) = n.get(..1) {
                n = f.to_uppercase() + &n[1..];
            }
            n.chars().take(128).collect()
        }),
        suggested_description: (!trimmed.is_empty()).then(|| trimmed.chars().take(500).collect()),
    }
}

fn lighting(x: &mut Text, d: &mut Map<String, Value>) {
    let light = x.first(LIGHTS);
    let side = x.first(LIGHT_SIDES);
    let words: Vec<&str> = [light, side].into_iter().flatten().collect();
    if !words.is_empty() {
        d.insert("lighting".into(), json!(words.join(" ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packshot_description_maps_onto_its_enums() {
        let e = from_text(
            "Flat lay of a crimson and navy scarf on marble, soft light from the left, no shadow, square, 4K png, with a sprig of lavender",
            PresetType::CreatePackshot,
        );
        let d = &e.instruction_data;
        assert_eq!(d["style"], "flat_lay");
        assert_eq!(d["shadow"], "none");
        assert_eq!(d["framing"], "square_packshot");
        assert_eq!(d["surface"], "marble");
        assert_eq!(d["lighting"], "soft diffused light from the left");
        assert_eq!(d["color_palette"], "red, navy blue, purple");
        assert_eq!(d["options"], json!({"size": "4K", "format": "png"}));
        assert_eq!(d["prompt"], "scarf sprig");
        assert_eq!(e.suggested_name.as_deref(), Some("Flat lay"));
    }

    #[test]
    fn an_identity_description_fills_only_what_it_says() {
        let e = from_text(
            "A 28-year-old East Asian woman, athletic, smiling, with shoulder-length wavy black hair, brown eyes and freckles",
            PresetType::IdentityCreation,
        );
        assert_eq!(
            e.instruction_data,
            json!({
                "appearance": {"gender": "female", "age": 28, "ethnicity": "East Asian", "build": "athletic", "expression": "smiling"},
                "face": {"eyes": "brown", "marks": "freckles"},
                "hair": {"color": "black", "length": "shoulder length", "style": "wavy"},
            })
        );
        let e = from_text("a man in his 40s with a beard", PresetType::IdentityCreation);
        assert_eq!(e.instruction_data["appearance"], json!({"gender": "male", "age": 45}));
        assert_eq!(e.instruction_data["face"], json!({"facial_hair": "beard"}));
    }

    #[test]
    fn an_on_model_description_gets_pose_camera_and_place() {
        let e = from_text(
            "Walking down a city street at golden hour, full body, 35mm, 4:5",
            PresetType::Flat2Model,
        );
        let d = &e.instruction_data;
        assert_eq!(d["pose"], "walking");
        assert_eq!(d["camera"], "full body, 35mm");
        assert_eq!(d["background"], "city");
        assert_eq!(d["lighting"], "warm golden-hour light");
        assert_eq!(d["options"], json!({"ar": "4:5"}));
    }

    #[test]
    fn words_inside_other_words_are_not_matched() {
        let e = from_text("a redesigned blackboard", PresetType::CreatePackshot);
        assert!(e.instruction_data.get("color_palette").is_none(), "{}", e.instruction_data);
        assert_eq!(e.instruction_data["prompt"], "redesigned blackboard");
        assert!(from_text("", PresetType::ModelSwap).instruction_data.as_object().unwrap().is_empty());
    }
}
