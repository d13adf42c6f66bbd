-- The pet clinic's tables, as AWS's Sequelize sample creates them: UUID keys made by the
-- client, relations without foreign-key constraints. Each statement runs in a transaction of
-- its own (DSQL allows one DDL per transaction); the runner records each as it lands.
CREATE TABLE owner (
    id uuid PRIMARY KEY,
    name varchar(30) NOT NULL,
    city varchar(80) NOT NULL,
    telephone varchar(20) NULL
);

CREATE TABLE pet (
    id uuid PRIMARY KEY,
    name varchar(30) NOT NULL,
    birth_date date NOT NULL,
    owner_id uuid NULL
);

CREATE TABLE specialty (
    name varchar(80) PRIMARY KEY
);

CREATE TABLE vet (
    id uuid PRIMARY KEY,
    name varchar(30) NOT NULL
);

CREATE TABLE vet_specialties (
    id uuid PRIMARY KEY,
    vet_id uuid NULL,
    specialty_id varchar(80) NULL
);
