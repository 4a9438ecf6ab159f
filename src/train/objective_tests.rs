//! Few-step objectives against hand computations, closed forms and the references' golden values.

use candle_core::{Device, Tensor};

use super::consistency::{
    consistency_forward, ct_ema_decay, ct_num_scales, ict_num_scales,
    lognormal_level_probabilities, ConsistencyParams, Distance,
};
use super::distill::{ddim_step, distillation_target, student_sigmas};
use super::*;
use crate::nn::{Cond, Ctx, MlpConfig, Model, ModelConfig};
use crate::sample::ModelOutput;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    crate::sample::randn(n, seed, 3)
}

#[test]
fn distillation_target_matches_a_hand_computation() {
    // Random (z_t, teacher predictions) and levels; the two DDIM steps and x̃ written out in f64.
    let (z, x1, x2) = (rand(16, 1), rand(16, 2), rand(16, 3));
    let (a, s) = (0.6f64, 0.8f64);
    let (a1, s1) = (0.8f64, 0.6f64);
    let (a2, s2) = (0.96f64, 0.28f64);
    let z1 = ddim_step(&z, &x1, (a, s), (a1, s1));
    let z2 = ddim_step(&z1, &x2, (a1, s1), (a2, s2));
    let got = distillation_target(&z, (a, s), &z2, (a2, s2));
    for j in 0..16 {
        let (zj, p1, p2) = (z[j] as f64, x1[j] as f64, x2[j] as f64);
        let h1 = a1 * p1 + s1 / s * (zj - a * p1);
        let h2 = a2 * p2 + s2 / s1 * (h1 - a1 * p2);
        let want = (h2 - s2 / s * zj) / (a2 - s2 / s * a);
        assert!(
            (got[j] as f64 - want).abs() < 1e-5,
            "{j}: {} vs {want}",
            got[j]
        );
    }
}

#[test]
fn distillation_target_of_an_exact_point_mass_teacher_is_the_point() {
    // Data = one point c: the ideal denoiser returns c everywhere, DDIM is then exact, and the
    // target x̃ is c for any z_t (two steps or one: the student must predict c).
    let c = rand(8, 7);
    let z = rand(8, 8);
    let (a, s) = (0.3f64, (1.0f64 - 0.09).sqrt());
    let mid = (0.7f64, (1.0f64 - 0.49).sqrt());
    let z1 = ddim_step(&z, &c, (a, s), mid);
    let z2 = ddim_step(&z1, &c, mid, (1.0, 0.0));
    let got = distillation_target(&z, (a, s), &z2, (1.0, 0.0));
    for j in 0..8 {
        assert!((got[j] - c[j]).abs() < 1e-5);
    }
    let z2 = ddim_step(&z1, &c, mid, (0.9, (1.0f64 - 0.81).sqrt()));
    let got = distillation_target(&z, (a, s), &z2, (0.9, (1.0f64 - 0.81).sqrt()));
    for j in 0..8 {
        assert!((got[j] - c[j]).abs() < 1e-4);
    }
}

#[test]
fn student_grid_halves_exactly_and_ends_at_zero() {
    let sch = Schedule::cosine(1000, 0.008, 0.999).unwrap();
    let s4 = student_sigmas(&sch, 4, Some(80.0)).unwrap();
    let s8 = student_sigmas(&sch, 8, Some(80.0)).unwrap();
    assert_eq!(s4.len(), 5);
    assert_eq!(*s4.last().unwrap(), 0.0);
    assert!((s4[0] - 80.0).abs() < 1e-9);
    // Every level of the 4-step grid is a level of the 8-step grid (the teacher's).
    for (i, v) in s4.iter().enumerate() {
        assert!(
            (v - s8[2 * i]).abs() < 1e-9 * v.max(1.0),
            "{i}: {v} vs {}",
            s8[2 * i]
        );
    }
    assert!(student_sigmas(&sch, 0, Some(80.0)).is_err());
    assert!(student_sigmas(&sch, 600, None).is_err());
    // Without the cap the top level is the last timestep.
    let full = student_sigmas(&sch, 4, None).unwrap();
    let last = crate::sample::sigma::schedule_sigmas(&sch)[999];
    assert!((full[0] - last).abs() < 1e-6 * last);
}

#[test]
fn ct_schedules_match_the_reference_golden_points() {
    let k_total = 800_000;
    for (k, n, mu) in [
        (0u64, 2usize, 0.9025),
        (100_000, 72, 0.998556),
        (800_000, 201, 0.999487),
    ] {
        let got = ct_num_scales(k, k_total, 2, 200);
        assert_eq!(got, n, "N({k})");
        assert!((ct_ema_decay(got, 2, 0.95) - mu).abs() < 5e-7, "μ({k})");
    }
    // iCT: s0 = 10, s1 = 1280, K' = K / 8; N doubles each stage and stops at s1 + 1.
    assert_eq!(ict_num_scales(0, 800, 10, 1280), 11);
    assert_eq!(ict_num_scales(99, 800, 10, 1280), 11);
    assert_eq!(ict_num_scales(100, 800, 10, 1280), 21);
    assert_eq!(ict_num_scales(350, 800, 10, 1280), 81);
    assert_eq!(ict_num_scales(799, 800, 10, 1280), 1281);
    assert_eq!(ict_num_scales(5000, 800, 10, 1280), 1281);
}

#[test]
fn lognormal_level_probabilities_are_a_distribution_peaked_near_the_mean() {
    let p = ConsistencyParams::default();
    let grid = p.karras_ascending(41).unwrap();
    let q = lognormal_level_probabilities(&grid, -1.1, 2.0);
    assert_eq!(q.len(), 40);
    assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(q.iter().all(|&v| v > 0.0));
    // The most likely pair brackets σ ≈ e^{-1.1} ≈ 0.33 up to the grid's unequal spacing.
    let best = q
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.partial_cmp(b.1).unwrap())
        .unwrap()
        .0;
    assert!(grid[best] < 2.0 && grid[best + 1] > 0.05, "{best}");
}

#[test]
fn karras_grid_matches_the_reference() {
    // karras(5, 0.002, 80) = [80, 17.5278, 2.51522, 0.169753, 0.002] (descending).
    let p = ConsistencyParams::default();
    let g = p.karras_ascending(5).unwrap();
    for (got, want) in g
        .iter()
        .rev()
        .zip([80.0, 17.5278, 2.51522, 0.169753, 0.002])
    {
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
    }
}

fn mlp(classes: usize) -> Model {
    let c = MlpConfig {
        data_shape: vec![4],
        hidden: 16,
        num_classes: classes,
        ..MlpConfig::default()
    };
    Model::new(ModelConfig::Mlp(c), 3, &Device::Cpu).unwrap()
}

#[test]
fn consistency_boundary_condition_is_exact() {
    let m = mlp(0);
    let p = ConsistencyParams::default();
    let xs = rand(12, 5);
    let x = Tensor::from_vec(xs.clone(), (3, 4), &Device::Cpu).unwrap();
    let f = consistency_forward(
        &m,
        &p,
        &x,
        &[p.sigma_min; 3],
        &Cond::default(),
        &Ctx::eval(),
    )
    .unwrap();
    assert_eq!(f.flatten_all().unwrap().to_vec1::<f32>().unwrap(), xs);
    // And c_skip → 0, c_out → σ_d at large σ.
    assert!(p.c_skip(80.0) < 1e-4 && (p.c_out(80.0) - 0.5).abs() < 1e-3);
}

#[test]
fn pseudo_huber_distance_is_the_formula() {
    let a = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(vec![0f32, 0.0, 3.0, 5.0], (2, 2), &Device::Cpu).unwrap();
    let c = 0.1;
    let d = Distance::parse("pseudo_huber", Some(c), 2)
        .unwrap()
        .per_sample(&a, &b)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = [(5.0f64 + c * c).sqrt() - c, (1.0f64 + c * c).sqrt() - c];
    for (g, w) in d.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6);
    }
    // iCT's default c = 0.00054 √d.
    assert_eq!(
        Distance::parse("pseudo_huber", None, 64).unwrap(),
        Distance::PseudoHuber(0.00054 * 8.0)
    );
    assert!(Distance::parse("lpips", None, 4).is_err());
}

/// An external teacher returning what the model teacher returns.
struct Wrapped(Model);
impl ExternalTeacher for Wrapped {
    fn predict(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: Option<&[u32]>,
    ) -> crate::Result<ModelOutput> {
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        self.0
            .predict_host_real_t(x, shape, &tf, labels, None, None)
    }
}

fn data() -> (Vec<f32>, Vec<usize>, Vec<u32>) {
    (rand(32 * 4, 11), vec![4], (0..32).map(|i| i % 3).collect())
}

fn config(objective: ObjectiveConfig) -> TrainConfig {
    TrainConfig {
        batch_size: 8,
        total_steps: 20,
        class_dropout: 0.2,
        prediction: "v".into(),
        objective,
        ..TrainConfig::default()
    }
}

fn objectives() -> Vec<ObjectiveConfig> {
    use super::consistency::{ConsistencyDistillationConfig, ConsistencyTrainingConfig};
    vec![
        ObjectiveConfig::ProgressiveDistillation(super::distill::ProgressiveConfig {
            student_steps: 4,
            guidance: Some(2.0),
            ..Default::default()
        }),
        ObjectiveConfig::ConsistencyDistillation(ConsistencyDistillationConfig::default()),
        ObjectiveConfig::ConsistencyTraining(ConsistencyTrainingConfig::default()),
        ObjectiveConfig::ConsistencyTraining(ConsistencyTrainingConfig {
            recipe: "ct".into(),
            ..Default::default()
        }),
    ]
}

#[test]
fn every_objective_resumes_bit_exactly() {
    let sch = Schedule::cosine(100, 0.008, 0.999).unwrap();
    let dir = std::env::temp_dir().join(format!("ferrodiff-objectives-{}", std::process::id()));
    for (i, objective) in objectives().into_iter().enumerate() {
        let teacher = objective.needs_teacher().then(|| TeacherNet::Model(mlp(3)));
        let teacher2 = objective.needs_teacher().then(|| TeacherNet::Model(mlp(3)));
        let (x, shape, y) = data();
        let mut a = Trainer::with_teacher(
            mlp(3),
            sch.clone(),
            config(objective.clone()),
            x.clone(),
            shape.clone(),
            Some(y.clone()),
            teacher,
        )
        .unwrap();
        let mut b = Trainer::with_teacher(
            mlp(3),
            sch.clone(),
            config(objective),
            x.clone(),
            shape.clone(),
            Some(y.clone()),
            teacher2,
        )
        .unwrap();
        let path = dir.join(format!("run{i}"));
        a.train(6, None, &mut NoTrainHooks).unwrap();
        b.train(3, Some((&path, 0)), &mut NoTrainHooks).unwrap();
        drop(b);
        let mut b = Trainer::resume(&path, x, shape, Some(y), &Device::Cpu)
            .expect("resume with the stored teacher");
        b.train(3, None, &mut NoTrainHooks).unwrap();
        assert_eq!(a.losses, b.losses, "objective {i}");
        assert!(a.losses.iter().all(|l| l.is_finite()));
        let (wa, wb) = (
            a.model().params().tensors().unwrap(),
            b.model().params().tensors().unwrap(),
        );
        for (k, t) in wa {
            let d = (t - &wb[&k]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "objective {i}: {k}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_external_teacher_trains_as_the_same_model_teacher() {
    let sch = Schedule::cosine(100, 0.008, 0.999).unwrap();
    for objective in objectives().into_iter().filter(|o| o.needs_teacher()) {
        let (x, shape, y) = data();
        let run = |teacher: TeacherNet| {
            let mut t = Trainer::with_teacher(
                mlp(3),
                sch.clone(),
                config(objective.clone()),
                x.clone(),
                shape.clone(),
                Some(y.clone()),
                Some(teacher),
            )
            .unwrap();
            t.train(4, None, &mut NoTrainHooks).unwrap();
            t.losses
        };
        let a = run(TeacherNet::Model(mlp(3)));
        let b = run(TeacherNet::External(Box::new(Wrapped(mlp(3)))));
        assert_eq!(a, b);
    }
}

#[test]
fn bad_objective_settings_are_clear_errors() {
    let sch = Schedule::cosine(100, 0.008, 0.999).unwrap();
    let (x, shape, y) = data();
    let make = |objective: ObjectiveConfig, teacher: Option<TeacherNet>| {
        Trainer::with_teacher(
            mlp(3),
            sch.clone(),
            config(objective),
            x.clone(),
            shape.clone(),
            Some(y.clone()),
            teacher,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let [pd, cd, ct, _] = <[ObjectiveConfig; 4]>::try_from(objectives()).ok().unwrap();
    assert!(make(pd.clone(), None).contains("needs a teacher"));
    assert!(make(ct.clone(), Some(TeacherNet::Model(mlp(3)))).contains("takes no teacher"));
    // A teacher of another shape or other classes.
    let other = Model::new(
        ModelConfig::Mlp(MlpConfig {
            data_shape: vec![5],
            hidden: 8,
            num_classes: 3,
            ..MlpConfig::default()
        }),
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert!(make(cd.clone(), Some(TeacherNet::Model(other))).contains("shape"));
    assert!(make(cd.clone(), Some(TeacherNet::Model(mlp(0)))).contains("classes"));
    // N < 2, too many student steps.
    let small = super::consistency::ConsistencyDistillationConfig {
        num_scales: 1,
        ..Default::default()
    };
    let e = make(
        ObjectiveConfig::ConsistencyDistillation(small),
        Some(TeacherNet::Model(mlp(3))),
    );
    assert!(e.contains("at least 2"), "{e}");
    let many = ObjectiveConfig::ProgressiveDistillation(super::distill::ProgressiveConfig {
        student_steps: 80,
        ..Default::default()
    });
    assert!(make(many, Some(TeacherNet::Model(mlp(3)))).contains("steps must be in"));
}

/// A batch of 2 images 1x4x4 with distinct pixels.
fn sr_batch<'a>(x0: &'a [f32], shape: &'a [usize], step: u64) -> objective::Batch<'a> {
    objective::Batch {
        x0,
        shape,
        labels: None,
        context: None,
        null_context: None,
        control: None,
        step,
        seed: 7,
    }
}

#[test]
fn super_resolution_conditioning_is_the_upsampled_block_means_without_augmentation() {
    let x0: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
    let shape = [2, 1, 4, 4];
    let plain = objective::SuperResolutionConfig {
        max_aug_level: 0.0,
        ..Default::default()
    };
    let (cond, levels) = plain.condition(&sr_batch(&x0, &shape, 3)).unwrap();
    assert_eq!(levels, vec![0.0, 0.0]);
    let low = crate::nn::resize::area_down(&x0, [2, 1, 4, 4], 2).unwrap();
    let want = crate::nn::resize::resize(
        &low,
        [2, 1, 2, 2],
        4,
        4,
        crate::nn::resize::Upsample::Bilinear,
    )
    .unwrap();
    assert_eq!(cond, want);
    // With augmentation: levels in [0, max], the same for the same (seed, step), other for
    // another step, and the image is the augmentation of the block means at those levels.
    let aug = objective::SuperResolutionConfig {
        max_aug_level: 0.6,
        upsample: "nearest".into(),
        ..Default::default()
    };
    let (a, la) = aug.condition(&sr_batch(&x0, &shape, 3)).unwrap();
    let (b, lb) = aug.condition(&sr_batch(&x0, &shape, 3)).unwrap();
    let (_, lc) = aug.condition(&sr_batch(&x0, &shape, 4)).unwrap();
    assert_eq!((a.clone(), la.clone()), (b, lb));
    assert_ne!(la, lc);
    assert!(la.iter().all(|&s| (0.0..=0.6).contains(&s)));
    let mut noisy = low.clone();
    crate::nn::resize::augment(
        &mut noisy,
        2,
        &la,
        7,
        crate::nn::resize::AUG_TRAIN_STREAM + 3,
    )
    .unwrap();
    let want = crate::nn::resize::resize(
        &noisy,
        [2, 1, 2, 2],
        4,
        4,
        crate::nn::resize::Upsample::Nearest,
    )
    .unwrap();
    assert_eq!(a, want);
}
